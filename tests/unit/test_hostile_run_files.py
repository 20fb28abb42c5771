"""Run files as a hostile or careless user writes them: each is refused by `iterdpo validate`
(and `run`, `plan`, `render`) with exit 2 and a short message naming the field or line,
never a traceback, and nothing is written."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from pathlib import Path

import pytest
import yaml

from iterdpo.cli import main

MAX_MESSAGE = 2400  # 8 problems of at most 240 characters, and the heading


def tiny_files(root: Path, *, positions: int = 1024) -> dict:
    """Just enough on disk for the local path checks: two model folders and a prompt file."""
    for name in ("policy", "reward"):
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "config.json").write_text(json.dumps({"max_position_embeddings": positions}))
    (root / "prompts.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    return {
        "apiVersion": "iterdpo.io/v1alpha1",
        "kind": "IterativeDPORun",
        "metadata": {"name": "hostile"},
        "spec": {
            "iterations": 1,
            "policy": {"model": "./policy"},
            "prompts": {"dataset": "./prompts.jsonl"},
            "reward": {"model": "./reward", "maxLength": 256, "batchTokens": 1024},
            "training": {"maxLength": 128, "maxPromptLength": 64, "globalBatchSize": 8, "microBatchSize": 2},
            "storage": {"root": "./runs"},
        },
    }


def cli(*argv: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(argv))
    return code, err.getvalue()


def refused(path: Path, *extra: str, command: str = "validate") -> str:
    """Exit 2, a short message without a traceback, and no file written next to the run file."""
    before = sorted(p.name for p in path.parent.iterdir())
    code, err = cli(command, str(path), *extra)
    assert code == 2, err
    assert "Traceback" not in err and len(err) < MAX_MESSAGE, err[:3000]
    assert sorted(p.name for p in path.parent.iterdir()) == before
    return err


@pytest.fixture()
def base(tmp_path: Path) -> dict:
    return tiny_files(tmp_path)


def write(tmp_path: Path, data, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def changed(base: dict, path: str, value) -> dict:
    data = copy.deepcopy(base)
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return data


def test_the_base_file_is_valid(tmp_path, base):
    code, err = cli("validate", str(write(tmp_path, base)), "--workdir", str(tmp_path / "w"))
    assert code == 0, err
    assert not (tmp_path / "w").exists() and not (tmp_path / "runs").exists()  # validate writes nothing


# -- bytes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"apiVersion: iterdpo.io/v1alpha1\n# caf\xe9\nkind: IterativeDPORun\n", "byte 0xe9 at line 2, column 6"),
        (bytes(range(256)) * 4, "not UTF-8 text: byte 0x80 at line"),
        ("kind: IterativeDPORun\n".encode("utf-16"), "not UTF-8 text: byte 0xff at line 1, column 1"),
    ],
    ids=["stray byte in a comment", "binary garbage", "utf-16"],
)
def test_bytes_that_are_not_utf8_are_refused_with_the_position(tmp_path, data, expected):
    assert expected in refused(write(tmp_path, data))


def test_a_utf8_bom_is_fine(tmp_path, base):
    path = write(tmp_path, b"\xef\xbb\xbf" + yaml.safe_dump(base).encode())
    assert cli("validate", str(path), "--workdir", str(tmp_path / "w"))[0] == 0


# -- shape ----------------------------------------------------------------------------------


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path):
    lines = ["a0: &a0 [" + ", ".join(["lol"] * 10) + "]"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    assert "expands to more than 100000 values" in refused(write(tmp_path, "\n".join(lines) + "\n"))


def test_deep_nesting_is_refused_without_a_recursion_error(tmp_path):
    assert "nested more than 32 levels deep" in refused(write(tmp_path, "a: " + "[" * 50_000 + "]" * 50_000))


def test_a_self_referencing_alias_is_refused(tmp_path):
    assert "an alias refers to the node that contains it" in refused(write(tmp_path, "a: &x [1, *x]\n"))


def test_a_duplicate_key_is_refused_naming_both_lines(tmp_path, base):
    text = yaml.safe_dump(base, sort_keys=False).replace("  iterations: 1\n", "  iterations: 1\n  iterations: 3\n")
    err = refused(write(tmp_path, text))
    assert "duplicate key 'iterations' (first at line" in err


def test_merge_keys_may_override_what_they_merge(tmp_path, base):
    text = yaml.safe_dump(base, sort_keys=False) + "x-defaults: &d {maxLength: 128}\n"
    path = write(tmp_path, text)
    assert "unknown field" in refused(path)  # the merge itself parsed; only the unknown top-level key is refused


def test_more_than_one_document_is_refused(tmp_path, base):
    text = yaml.safe_dump(base) + "---\n" + yaml.safe_dump(base)
    assert "a second YAML document; a run file holds exactly one" in refused(write(tmp_path, text))


def test_a_huge_file_is_refused_by_its_size_before_it_is_read(tmp_path):
    path = tmp_path / "run.yaml"
    with path.open("wb") as f:
        f.truncate(64 << 20)  # sparse: 64 MiB that was never written
    assert f"is {64 << 20} bytes; a run file is at most 1048576 bytes" in refused(path)


def test_a_folder_or_a_missing_file_is_refused(tmp_path):
    (tmp_path / "run.yaml").mkdir()
    assert "is a folder, not a file" in refused(tmp_path / "run.yaml")
    assert "cannot read the file: No such file or directory" in refused(tmp_path / "missing.yaml")


@pytest.mark.parametrize(("text", "expected"), [("", "no YAML document"), ("- a\n- b\n", "must be a mapping")])
def test_empty_files_and_other_documents(tmp_path, text, expected):
    assert expected in refused(write(tmp_path, text))


def test_a_yaml_error_does_not_quote_the_whole_line(tmp_path):
    err = refused(write(tmp_path, "a: [1, 2\nb: " + "x" * 200_000 + "\n"))
    assert "not valid YAML: line 2" in err and "xxxxxxxxxx" not in err


# -- types as strict as the CRD's -----------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("spec.generation.samplesPerPrompt", "8", "spec.generation.samplesPerPrompt: must be an integer (got '8')"),
        ("spec.generation.temperature", "0.7", "spec.generation.temperature: must be a number (got '0.7')"),
        ("spec.generation.enforceEager", "true", "spec.generation.enforceEager: must be true or false"),
        ("spec.policy.model", 7, "spec.policy.model: must be a string (quote it) (got 7)"),
        ("spec.generation", [1], "spec.generation: must be a mapping"),
    ],
)
def test_a_value_of_the_wrong_type_is_not_coerced(tmp_path, base, path, value, expected):
    assert expected in refused(write(tmp_path, changed(base, path, value)))


def test_a_field_spelled_in_snake_case_is_an_unknown_field(tmp_path, base):
    data = changed(base, "spec.generation.samples_per_prompt", 4)
    assert "spec.generation.samples_per_prompt: unknown field (did you mean 'samplesPerPrompt'?)" in refused(write(tmp_path, data))


def test_a_field_in_another_case_is_an_unknown_field(tmp_path, base):
    data = changed(base, "spec.Iterations", 2)
    assert "spec.Iterations: unknown field (did you mean 'iterations'?)" in refused(write(tmp_path, data))


def test_exponent_floats_are_numbers_as_kubectl_reads_them(tmp_path, base):
    text = yaml.safe_dump(changed(base, "spec.training.learningRate", "PLACEHOLDER")).replace("PLACEHOLDER", "1e-6")
    code, err = cli("validate", str(write(tmp_path, text)), "--workdir", str(tmp_path / "w"))
    assert code == 0, err


# -- numbers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "text", "expected"),
    [
        ("spec.generation.seed", "9" * 5000, "an integer of 5000 digits"),
        ("spec.generation.temperature", ".nan", "spec.generation.temperature: must be a finite number"),
        ("spec.training.learningRate", "1e400", "spec.training.learningRate: must be a finite number"),
        ("spec.reward.timeoutSeconds", "-.inf", "spec.reward.timeoutSeconds: must be a finite number"),
        ("spec.generation.seed", "-1", "spec.generation.seed: must be >= 0 (got -1)"),
        ("spec.generation.seed", str(2**32), "spec.generation.seed: must be <= 4294967295"),
        ("spec.training.seed", str(2**63), "spec.training.seed: must be <= 4294967295"),
        ("spec.kubernetes.retryBackoffSeconds", "1e9", "spec.kubernetes.retryBackoffSeconds: must be <= 3600.0"),
        ("spec.generation.maxNewTokens", str(10**12), "spec.generation.maxNewTokens: must be <= 2097152"),
        ("spec.reward.requestBatchSize", "5000", "spec.reward.requestBatchSize: must be <= 4096"),
    ],
)
def test_numbers_are_bounded(tmp_path, base, path, text, expected):
    path_file = write(tmp_path, yaml.safe_dump(changed(base, path, "PLACEHOLDER")).replace("PLACEHOLDER", text))
    assert expected in refused(path_file)


# -- lengths that cannot fit together -------------------------------------------------------


def test_a_context_that_cannot_hold_the_longest_prompt_is_refused(tmp_path, base):
    data = changed(base, "spec.generation.maxModelLen", 64)  # training.maxPromptLength is 64
    assert "spec.generation.maxModelLen: must be more than training.maxPromptLength (64)" in refused(write(tmp_path, data))


def test_lengths_beyond_the_models_positions_are_refused(tmp_path):
    data = tiny_files(tmp_path, positions=100)
    err = refused(write(tmp_path, data))
    assert "spec.training.maxLength: 128 is more than the model's context, 100 tokens" in err
    assert "spec.reward.maxLength: 256 is more than the model's context, 100 tokens" in err


def test_more_than_one_training_node_is_refused_on_one_machine(tmp_path, base):
    data = changed(base, "spec.training.nodes", 2)
    err = refused(write(tmp_path, data), "--workdir", str(tmp_path / "w"))
    assert "spec.training.nodes: iterdpo run trains on this machine only" in err
    assert cli("validate", str(tmp_path / "run.yaml"), "--kubernetes")[1].count("spec.training.nodes") == 0


# -- local paths ----------------------------------------------------------------------------


def test_a_missing_model_names_the_field(tmp_path, base):
    err = refused(write(tmp_path, changed(base, "spec.policy.model", "./nope")))
    assert f"spec.policy.model: {tmp_path}/nope does not exist" in err


def test_a_missing_path_under_the_runs_volume_says_it_was_looked_for_on_the_volume(tmp_path, base):
    """A stage program in a pod reads the pod's copy of the run: a missing /iterdpo/... path is
    missing from the claim, and the message says so (never a hub error)."""
    data = changed(changed(base, "spec.policy.model", "/iterdpo/tiny/policy"), "spec.kubernetes", {"volume": {"claimName": "data"}})
    data["spec"]["prompts"] = {"dataset": "/iterdpo/tiny/prompts.jsonl"}
    err = refused(write(tmp_path, data))
    assert "spec.policy.model: /iterdpo/tiny/policy does not exist on the volume (claim data, mounted at /iterdpo in the pods)" in err
    assert "spec.prompts.dataset: /iterdpo/tiny/prompts.jsonl does not exist on the volume" in err


def test_a_model_that_is_a_file_or_empty_or_has_no_config(tmp_path, base):
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "noconfig").mkdir()
    (tmp_path / "noconfig" / "weights.bin").write_text("x")
    assert "is a file; a model is a folder" in refused(write(tmp_path, changed(base, "spec.policy.model", "./file")))
    assert "is an empty folder" in refused(write(tmp_path, changed(base, "spec.reward.model", "./empty")))
    assert "has no config.json" in refused(write(tmp_path, changed(base, "spec.policy.model", "./noconfig")))


def test_prompt_data_that_is_missing_empty_or_of_the_wrong_kind(tmp_path, base):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "emptydir").mkdir()
    for value, expected in [("./missing.jsonl", "does not exist"), ("./empty.jsonl", "is empty"),
                            ("./notes.txt", "has type '.txt'; allowed: .jsonl, .json, .parquet, .arrow"),
                            ("./emptydir", "is an empty folder")]:  # fmt: skip
        err = refused(write(tmp_path, changed(base, "spec.prompts.dataset", value)))
        assert f"spec.prompts.dataset: {tmp_path}/{value[2:]} {expected}" in err, err


def test_a_storage_root_that_cannot_be_created(tmp_path, base):
    (tmp_path / "afile").write_text("x")
    err = refused(write(tmp_path, changed(base, "spec.storage.root", "./afile/runs")))
    assert f"spec.storage.root: cannot create {tmp_path}/afile/runs: {tmp_path}/afile is a file" in err
    err = refused(write(tmp_path, changed(base, "spec.storage.root", "./afile")))
    assert "is a file; the run's artifacts need a folder" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_storage_root_that_is_not_writable(tmp_path, base):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    err = refused(write(tmp_path, changed(base, "spec.storage.root", "./locked/runs")))
    assert "cannot be created" in err and "is not writable" in err


def test_a_hub_id_that_names_a_local_folder_says_which_was_assumed(tmp_path, base):
    err = refused(write(tmp_path, changed(base, "spec.policy.model", "policy")))
    assert "spec.policy.model: 'policy' is taken as a hub id" in err and "write './policy' to use it" in err


@pytest.mark.parametrize("value", ["a/b/c", "has space", "~/models/x", "org/--x"])
def test_a_value_that_is_neither_a_path_nor_a_hub_id(tmp_path, base, value):
    err = refused(write(tmp_path, changed(base, "spec.reward.model", value)))
    assert "spec.reward.model:" in err and "is neither a local path" in err


def test_a_path_escaping_the_volume_after_dotdot_is_refused_for_kubernetes(tmp_path, base):
    data = changed(base, "spec.kubernetes.volume.claimName", "data")
    for path, value in [("spec.policy.model", "/iterdpo/../etc/models"), ("spec.reward.model", "/iterdpo/r"),
                        ("spec.prompts.dataset", "/iterdpo/p.jsonl"), ("spec.storage.root", "/iterdpo/runs")]:  # fmt: skip
        data = changed(data, path, value)
    err = refused(write(tmp_path, data), "--kubernetes")
    assert "spec.policy.model: '/iterdpo/../etc/models' cannot exist in the pods" in err
    assert err.count("cannot exist in the pods") == 1


# -- chat templates -------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["spec.policy.chatTemplate", "spec.reward.chatTemplate"])
def test_a_chat_template_that_does_not_compile(tmp_path, base, field):
    data = changed(base, field, "{% for m in messages %}{{ m.content }}\n{% endif %}")
    err = refused(write(tmp_path, data))
    assert f"{field}: the chat template does not compile: line 2:" in err


def test_a_template_using_loop_controls_compiles(tmp_path, base):
    data = changed(base, "spec.policy.chatTemplate", "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{{ m.content }}{% endfor %}")
    assert cli("validate", str(write(tmp_path, data)), "--workdir", str(tmp_path / "w"))[0] == 0


# -- Kubernetes values ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("spec.kubernetes.resources.train.memory", "64 GB", "must be a Kubernetes quantity"),
        ("spec.kubernetes.resources.generate.cpu", "-1", "must be a Kubernetes quantity"),
        ("spec.kubernetes.volume.claimName", "My_Claim", "must be a Kubernetes object name"),
        ("spec.kubernetes.hubTokenSecret", {"name": "hf", "key": "a b"}, "must be a Secret key"),
        ("spec.kubernetes.rewardTokenSecret", {"name": "x" * 300}, "300 characters, at most 253"),
        ("spec.kubernetes.serviceAccountName", "-sa", "must be a Kubernetes object name"),
        ("spec.kubernetes.nodeSelector", {"bad key": "v"}, "must be a label key"),
        ("spec.kubernetes.nodeSelector", {"gpu": "v" * 64}, "must be a label value"),
        ("spec.kubernetes.nodeSelector", {"a" * 64: "v"}, "the name after '/' is 64 characters"),
        ("spec.kubernetes.image", "iterdpo: latest", "must be a container image reference"),
        ("spec.kubernetes.volume.mountPath", "data", "must be an absolute path"),
        ("spec.kubernetes.volume.mountPath", "/iterdpo/../etc", "no '.' or '..' parts"),
        ("spec.kubernetes.tolerations", [{"operator": "Exists", "value": "x"}], "[0]: operator Exists matches any value"),
        ("spec.kubernetes.tolerations", [{"value": "x"}], "[0]: without a key it matches every taint"),
        ("spec.kubernetes.tolerations", [{"key": "k", "value": "not ok"}], "must be a label value"),
        ("metadata.namespace", "Team_A", "must be a namespace name"),
    ],
)
def test_kubernetes_values_are_checked_before_any_manifest(tmp_path, base, path, value, expected):
    data = changed(base, path, value)
    for command in ("validate", "render"):
        err = refused(write(tmp_path, data), command=command)
        field = path.split(".")[0] if path.startswith("metadata") else path
        assert field in err and expected in err, err


# -- every message stays short --------------------------------------------------------------


def test_a_huge_value_is_never_echoed(tmp_path, base):
    data = changed(base, "spec.pairing.strategy", "x" * 500_000)
    data["spec"]["y" * 100_000] = 1
    err = refused(write(tmp_path, data))
    assert "unknown value" in err and "500002 chars" in err


def test_many_problems_are_capped(tmp_path, base):
    data = copy.deepcopy(base)
    for i in range(40):
        data["spec"][f"unknown{i}"] = i
    err = refused(write(tmp_path, data))
    assert "... and 32 more" in err


def test_run_and_plan_refuse_the_same_files_and_write_nothing(tmp_path, base):
    path = write(tmp_path, changed(base, "spec.policy.model", "./nope"))
    for command in ("run", "plan"):
        err = refused(path, "--workdir", str(tmp_path / "w"), command=command)
        assert "spec.policy.model" in err
        assert not (tmp_path / "w").exists()


# -- whatever the input: exit 0 or 2, a short message, never a traceback --------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40), st.binary(max_size=20).map(lambda b: b.decode("latin-1")),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=8), st.integers(), max_size=3),
)  # fmt: skip


def _paths(data, prefix=()):
    yield prefix
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _paths(value, (*prefix, key))


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_any_change_to_a_valid_file_is_valid_or_a_short_error(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("fuzz")
    base = tiny_files(root)
    doc = copy.deepcopy(base)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(list(_paths(doc))[1:]))
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = data.draw(_LEAVES)
    text = yaml.safe_dump(doc, allow_unicode=data.draw(st.booleans()))
    if data.draw(st.booleans()):  # and sometimes damage the text itself
        at = data.draw(st.integers(0, len(text)))
        text = text[:at] + data.draw(st.text(max_size=6)) + text[at:]
    path = write(root, text.encode("utf-8", "surrogatepass"))
    code, err = cli("validate", str(path), "--workdir", str(root / "w"))
    assert code in (0, 2) and "Traceback" not in err and len(err) < MAX_MESSAGE, err[:3000]


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=400))
def test_any_bytes_are_valid_or_a_short_error(tmp_path_factory, blob):
    path = write(tmp_path_factory.mktemp("bytes"), blob)
    code, err = cli("validate", str(path))
    assert code == 2 and "Traceback" not in err and len(err) < MAX_MESSAGE, err[:3000]


def test_a_stage_model_that_is_not_a_model_folder_is_a_stage_error(tmp_path):
    """A round's policy (the previous round's checkpoint) is checked before it is loaded: a local
    path fails as a local path (exit 1, naming it), never as Hugging Face's 'Repo id must be ...'."""
    from iterdpo.errors import StageError
    from iterdpo.localpaths import require_model

    with pytest.raises(StageError, match=r"^the policy of round 2: /nope/ckpt does not exist .*; run the Train stage of round 1 first$"):
        require_model("/nope/ckpt", "the policy of round 2", 2)
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(StageError, match="is an empty folder"):
        require_model(str(tmp_path / "ckpt"), "the reference model of round 1", 1)
    require_model("org/model", "the policy of round 1", 1)  # a hub id is not looked up
