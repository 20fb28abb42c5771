"""Read one YAML document the way the API server would, with every input bounded.

PyYAML's `safe_load` is not enough for a file a user (or an attacker) hands us:
it lets a duplicate key silently win, expands alias bombs into gigabytes once the
data is walked, overflows Python's stack on deep nesting, parses `1e-6` as a string
(YAML 1.1; `kubectl` parses it as a number), and raises on an integer of thousands
of digits. Here each of those is a `YamlError` whose message names the line and
stays short, whatever the input. Only data (mappings, sequences, scalars) comes
back, as from `safe_load`.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

MAX_BYTES = 1 << 20  # far above any run file; kubectl apply keeps its copy in a 256 KiB annotation
MAX_DEPTH = 32  # the spec nests 5 deep
MAX_NODES = 100_000  # after expanding aliases: what walking the data would cost
MAX_INT_DIGITS = 30  # int64 has 19 digits; anything longer is refused by the schema anyway
SNIPPET = 60  # characters of an offending value quoted in a message


class YamlError(ValueError):
    """The text is not one bounded YAML document; the message says where and why."""


def clip(text: str, limit: int = SNIPPET) -> str:
    """`text`, cut to about `limit` characters: a message never echoes a whole input."""
    return text if len(text) <= limit else f"{text[: max(limit - 20, 8)]}... ({len(text)} chars)"


def short(value: object, limit: int = SNIPPET) -> str:
    """`repr(value)`, clipped."""
    return clip(repr(value), limit)


def read_text(path: Path, *, max_bytes: int = MAX_BYTES) -> str:
    """The file as UTF-8 text; refused by size before it is read, and by its first bad byte."""
    try:
        size = path.stat().st_size
        if path.is_dir():
            raise YamlError("is a folder, not a file")
        if size > max_bytes:
            raise YamlError(f"is {size} bytes; a run file is at most {max_bytes} bytes")
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise YamlError(f"cannot read the file: {exc.strerror or exc}") from None
    if len(data) > max_bytes:  # grew while we looked
        raise YamlError(f"is more than {max_bytes} bytes; a run file is at most {max_bytes} bytes")
    return decode(data)


def decode(data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start]
        line = before.count(b"\n") + 1
        column = exc.start - (before.rfind(b"\n") + 1) + 1
        raise YamlError(f"not UTF-8 text: byte 0x{data[exc.start]:02x} at line {line}, column {column} "
                        "(save the file as UTF-8)") from None  # fmt: skip
    return text.removeprefix("\ufeff")


def load_one(text: str) -> object:
    """The single non-empty document of `text` (None if there is none)."""
    _check_events(text)
    loader = _Loader(text)
    try:
        roots = []
        while loader.check_node():
            node = loader.get_node()
            if not _empty(node):
                roots.append(node)
        if len(roots) > 1:
            raise YamlError(f"line {roots[1].start_mark.line + 1}: a second YAML document; a run file holds exactly one")
        if not roots:
            return None
        _check_size(roots[0])
        return loader.construct_document(roots[0])
    except yaml.YAMLError as exc:
        raise YamlError(_where(exc)) from None
    finally:
        loader.dispose()


def _check_events(text: str) -> None:
    """Nesting depth and document count, from the event stream: the parser is iterative,
    so a file nested 100 000 deep is refused here instead of overflowing the composer."""
    depth = 0
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    raise YamlError(f"line {event.start_mark.line + 1}: nested more than {MAX_DEPTH} levels deep")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
    except yaml.YAMLError as exc:
        raise YamlError(_where(exc)) from None


def _check_size(root: yaml.Node) -> None:
    """Count nodes as the data would hold them, aliases expanded (an alias is the same
    node object again): a billion-laughs file is refused before it is walked."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_:
            raise YamlError(f"line {node.start_mark.line + 1}: an alias refers to the node that contains it")
        open_.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total += sum(size(v) for v in node.value)
        if total > MAX_NODES:
            raise YamlError(f"line {node.start_mark.line + 1}: expands to more than {MAX_NODES} values "
                            "(aliases repeated inside aliases?)")  # fmt: skip
        open_.discard(key)
        sizes[key] = total
        return total

    size(root)


def _empty(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _where(exc: yaml.YAMLError) -> str:
    """PyYAML's message without its quoted copy of the line (which may be megabytes)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    text = f"{where}{problem}" + (f" ({context})" if context else "")
    return f"not valid YAML: {text[:200]}"


class _Loader(yaml.SafeLoader):
    """SafeLoader, stricter: no duplicate keys, bounded integers, YAML 1.2 exponent floats."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[object, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:  # a list or mapping as a key
                    raise YamlError(f"line {line}: a key must be a plain value") from None
                if first is not None:
                    raise YamlError(f"line {line}: duplicate key {short(key)} (first at line {first}); "
                                    "a key may appear once")  # fmt: skip
                seen[key] = line
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        digits = sum(c.isdigit() for c in node.value)
        if digits > MAX_INT_DIGITS:
            raise YamlError(f"line {node.start_mark.line + 1}: an integer of {digits} digits; "
                            "the largest allowed is 2^63 - 1")  # fmt: skip
        return super().construct_yaml_int(node)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
# `1e-6` and `5E+3` are numbers to kubectl (YAML 1.2); PyYAML's 1.1 resolver wants a dot.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)
