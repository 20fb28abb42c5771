"""Deterministic tiny models and prompts for the demo and the tests (no downloads).

- A byte-level BPE tokenizer trained in code on a small word corpus.
- The policy: a randomly initialised tiny Llama (`LlamaForCausalLM`), seeded. It rarely ends
  an answer (most run to maxNewTokens). `short-policy/` is the same model with a prior on the
  end token too, so its answers end after a few words: what a length-paying reward can
  inflate (examples/tiny-length-gate.yaml).
- The reward model: a tiny `LlamaForSequenceClassification` whose weights are
  set by hand so that it computes a reward DPO can learn in a few steps: the
  mean, over every token of the conversation, of +1 for a "kind" word, -1 for
  an "unkind" word, 0 otherwise (times a scale). It is a real transformers
  model, served like any other; only its weights are constructed, not trained.
  How: every token embedding carries a constant in dim 0 and its value in
  dim 1; layer 0's attention has zero queries and keys, so it attends
  uniformly over the sequence and writes the mean value into dim 2; every
  other block is zero, so the residual stream passes through; the score head
  reads dim 2.
- A multi-objective reward model (`armo/`) of ArmoRM's checkpoint layout
  (LlamaForRewardModelWithGating: a Llama backbone, `regression_layer`, `gating.*`,
  `reward_transform_matrix`), written as safetensors without any iterdpo class: objective
  `kindness` is the tiny reward model's signal, `harshness` its opposite, `brevity` a constant;
  the gating network is random. Reward kind multi-objective must read it as ArmoRM is read.
- Prompt sets: one JSONL file per round of chat messages.
- An arithmetic prompt set (`arithmetic.jsonl`): "what is 2 + 3" with its gold answer in
  `answer`, for reward kind verifiable (examples/tiny-verifiable.yaml). The tiny policy knows
  no arithmetic; what DPO on the rule's rewards teaches it first is to answer with a number.
- A chat set (`sft.jsonl`): conversations whose assistant turns are short word-salad answers
  about the prompt's topic, for the SFT stage (examples/tiny-sft.yaml).
- A preference set (`preferences.jsonl`, the report's format: `chosen` and `rejected` are
  whole conversations sharing the prompt turn): two word-salad responses per prompt, the one
  the hand-wired reward model scores higher is `chosen`. The reward model is then the *gold*
  model, and a Bradley-Terry model trained on the set (the RewardModel stage) is the proxy.

The reward model has its own chat template, different from the policy's, as a
real reward model would: the reward server must format with the RM's template.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

KIND_WORDS = (
    "kind", "gentle", "happy", "bright", "warm", "calm", "brave", "honest", "clear", "fair",
    "glad", "good", "great", "joy", "love", "nice", "safe", "smile", "sweet", "thanks",
    "hope", "help", "peace", "proud",
)
UNKIND_WORDS = (
    "cruel", "harsh", "sad", "dark", "cold", "angry", "afraid", "false", "vague", "unfair",
    "bad", "awful", "hate", "mean", "rude", "risk", "sour", "blame", "fear", "gloom",
    "harm", "pain", "war", "grim",
)
NEUTRAL_WORDS = (
    "the", "a", "of", "and", "to", "in", "is", "it", "that", "on", "for", "with", "as", "was",
    "river", "stone", "tree", "cloud", "road", "house", "city", "music", "book", "table",
    "garden", "window", "ocean", "mountain", "bridge", "market", "train", "letter", "lamp",
    "clock", "forest", "island", "village", "paper", "story", "morning", "evening", "winter",
    "summer", "about", "tell", "me", "describe", "write", "explain", "what", "why", "how",
    "short", "note", "your", "day", "friend", "please", "one", "two", "some", "this",
)
TOPICS = (
    "river", "stone", "tree", "cloud", "road", "house", "city", "music", "book", "table",
    "garden", "window", "ocean", "mountain", "bridge", "market", "train", "letter", "lamp",
    "clock", "forest", "island", "village", "paper", "story", "morning", "evening", "winter",
    "summer", "day", "friend",
)
PROMPT_FORMS = (
    "tell me about the {}",
    "describe the {}",
    "write a short note about the {}",
    "explain the {} to a friend",
    "what is the {}",
    "why is the {} good or bad",
)

POLICY_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eos|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Deliberately unlike the policy's: scoring with the wrong template is a known failure.
REWARD_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}\n{% endfor %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>", "<|system|>", "<|user|>", "<|assistant|>"]

HIDDEN = 128
EMBED_CONSTANT = 10.0  # dim-0 constant: keeps RMSNorm from distorting the value dims
REWARD_SCALE = 8.0
WORD_PRIOR_LOGIT = 3.0  # the policy's preference for whole words over byte pieces
# short-policy's end token: this much above a whole word. Its held-out answers, sampled by vLLM
# at temperature 1 with at most 24 tokens: 8.1 tokens on average, 5% cut at the limit (at +2.0:
# 15 tokens, 38% cut); one round of DPO on a length-paying reward takes them to 22.9.
END_PRIOR_LOGIT = WORD_PRIOR_LOGIT + 3.0


@dataclass(frozen=True)
class TinyAssets:
    root: Path
    policy: Path
    reward: Path
    prompts: tuple[Path, ...]  # one prompt file per round
    preferences: Path  # pairs labelled by the gold (hand-wired) reward model
    sft: Path  # chat conversations for the SFT stage (examples/tiny-sft.yaml)
    arithmetic: Path  # sums with gold answers (field `answer`), for reward kind verifiable
    evaluation: Path  # held-out prompts (spec.evaluation.prompts): forms no round's prompt uses
    armo: Path  # a multi-objective reward model of ArmoRM's layout
    short_policy: Path  # the policy with an end-token prior: short answers that DPO can lengthen


def build_tiny(out: Path, *, rounds: int = 3, prompts_per_round: int = 64, preference_pairs: int = 1024,
               seed: int = 0) -> TinyAssets:  # fmt: skip
    """Build (or reuse, if complete) the tiny assets under `out`."""
    out = Path(out)
    assets = TinyAssets(
        root=out,
        policy=out / "policy",
        reward=out / "reward",
        prompts=tuple(out / f"prompts-iter{r}.jsonl" for r in range(1, rounds + 1)),
        preferences=out / "preferences.jsonl",
        sft=out / "sft.jsonl",
        arithmetic=out / "arithmetic.jsonl",
        evaluation=out / "eval-prompts.jsonl",
        armo=out / "armo",
        short_policy=out / "short-policy",
    )
    marker = out / ".complete.json"
    wanted = {"rounds": rounds, "prompts_per_round": prompts_per_round, "preference_pairs": preference_pairs,
              "seed": seed, "version": 9}  # fmt: skip
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return assets

    from transformers.utils import logging as hf_logging

    from iterdpo.atomic import atomic_path, write_json, write_jsonl

    hf_logging.disable_progress_bar()
    tokenizer = _train_tokenizer()
    with atomic_path(assets.policy) as tmp:
        _build_policy(tokenizer, seed).save_pretrained(tmp)
        _with_template(tokenizer, POLICY_TEMPLATE).save_pretrained(tmp)
    with atomic_path(assets.short_policy) as tmp:
        _build_policy(tokenizer, seed, end_prior=END_PRIOR_LOGIT).save_pretrained(tmp)
        _with_template(tokenizer, POLICY_TEMPLATE).save_pretrained(tmp)
    with atomic_path(assets.reward) as tmp:
        _build_reward_model(tokenizer).save_pretrained(tmp)
        _with_template(tokenizer, REWARD_TEMPLATE).save_pretrained(tmp)
    with atomic_path(assets.armo) as tmp:
        _write_armo(tokenizer, tmp, seed)
        _with_template(tokenizer, POLICY_TEMPLATE).save_pretrained(tmp)
    for path in (*assets.policy.iterdir(), *assets.short_policy.iterdir(), *assets.reward.iterdir(), *assets.armo.iterdir()):
        path.chmod(0o644)  # transformers writes weights 0600; other users and containers must read them
    rng = random.Random(seed)
    for path in assets.prompts:
        write_jsonl(path, _prompts(rng, prompts_per_round))
    write_jsonl(assets.preferences, _preferences(assets.reward, random.Random(seed + 1), preference_pairs))
    write_jsonl(assets.sft, _conversations(random.Random(seed + 2), SFT_CONVERSATIONS))
    write_jsonl(assets.arithmetic, _sums(random.Random(seed + 3), ARITHMETIC_PROMPTS))
    write_jsonl(assets.evaluation, _held_out_prompts(random.Random(seed + 4), EVAL_PROMPTS))
    write_json(marker, wanted)
    return assets


def token_values(tokenizer) -> dict[int, float]:
    """+1 for kind words, -1 for unkind words; every other token is 0 (absent)."""
    values = {}
    for word, value in [(w, 1.0) for w in KIND_WORDS] + [(w, -1.0) for w in UNKIND_WORDS]:
        for text in (word, " " + word):
            ids = tokenizer.encode(text, add_special_tokens=False)
            if len(ids) == 1:
                values[ids[0]] = value
    return values


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = list(KIND_WORDS) + list(UNKIND_WORDS) + list(NEUTRAL_WORDS)
    corpus = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    corpus += [form.format(t) for form in PROMPT_FORMS for t in TOPICS]
    tok = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=640,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        unk_token="<|unk|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )


def _with_template(tokenizer, template: str):
    """The same tokenizer, carrying `template` as its chat template when saved."""
    tokenizer.chat_template = template
    return tokenizer


def _config(tokenizer, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
        **extra,
    )


def word_token_ids(tokenizer) -> list[int]:
    """Tokens that are whole words of the corpus (with or without their leading space)."""
    ids = set()
    for word in (*KIND_WORDS, *UNKIND_WORDS, *NEUTRAL_WORDS):
        for text in (word, " " + word):
            encoded = tokenizer.encode(text, add_special_tokens=False)
            if len(encoded) == 1:
                ids.add(encoded[0])
    return sorted(ids)


def _build_policy(tokenizer, seed: int, *, end_prior: float | None = None):
    """A random tiny Llama with an SFT-like prior: it prefers whole words.

    A uniform random policy mostly samples byte pieces, so few sampled tokens
    carry reward and nothing ties them together. Here every embedding carries a
    constant in dim 0, which survives to the final norm, and lm_head reads it
    to add WORD_PRIOR_LOGIT to every whole-word token. That shared direction is
    also what lets DPO raise "kind" words in every context at once. `end_prior`: the end
    token's logit boost the same way (None: none, so answers rarely end before the limit).
    """
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(_config(tokenizer))
    words = word_token_ids(tokenizer)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[words, 0] = 1.0
        probe = torch.tensor([tokenizer.encode(" ".join(TOPICS), add_special_tokens=False)])
        logits = model(probe).logits[0]
        others = [i for i in range(len(tokenizer)) if i not in set(words)]
        offset = (logits[:, words].mean() - logits[:, others].mean()).item()
        model.lm_head.weight[words, 0] = WORD_PRIOR_LOGIT / offset
        if end_prior is not None:
            model.lm_head.weight[tokenizer.eos_token_id, 0] = end_prior / offset
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def _build_reward_model(tokenizer):
    import torch
    from transformers import LlamaForSequenceClassification

    model = LlamaForSequenceClassification(_config(tokenizer, num_labels=1))
    values = token_values(tokenizer)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                param.fill_(1.0)
        embed = model.model.embed_tokens.weight
        embed[:, 0] = EMBED_CONSTANT
        for token_id, value in values.items():
            embed[token_id, 1] = value
        attn = model.model.layers[0].self_attn
        attn.v_proj.weight[0, 1] = 1.0  # value = the token's (normalised) value dim
        attn.o_proj.weight[2, 0] = 1.0  # head 0's mean value -> residual dim 2
        # After both RMSNorms a token value v arrives as ~1.27 v; scale to reward units.
        model.score.weight[0, 2] = REWARD_SCALE
    return model


def _prompts(rng: random.Random, count: int) -> list[dict]:
    rows = []
    for i in range(count):
        form = rng.choice(PROMPT_FORMS)
        topic = rng.choice(TOPICS)
        rows.append({"id": f"p{i:04d}", "messages": [{"role": "user", "content": form.format(topic)}]})
    return rows


EVAL_PROMPTS = 32
EVAL_PROMPT_FORMS = ("say a few words about the {}", "give me your view of the {}")  # none of PROMPT_FORMS


def _held_out_prompts(rng: random.Random, count: int) -> list[dict]:
    """Distinct prompts in forms no round's prompt set uses: disjoint from them by content."""
    pairs = [(form, topic) for form in EVAL_PROMPT_FORMS for topic in TOPICS]
    return [{"id": f"e{i:04d}", "messages": [{"role": "user", "content": form.format(topic)}]}
            for i, (form, topic) in enumerate(rng.sample(pairs, count))]  # fmt: skip


PREFERENCE_WORDS = (6, 16)  # words per synthetic response


def _response(rng: random.Random, topic: str) -> str:
    """A response like the tiny policy's samples: whole words, a few of them kind or unkind."""
    words = [topic] + [rng.choice(NEUTRAL_WORDS) for _ in range(rng.randint(*PREFERENCE_WORDS))]
    for _ in range(rng.randint(0, 4)):
        words[rng.randrange(1, len(words))] = rng.choice(KIND_WORDS if rng.random() < 0.5 else UNKIND_WORDS)
    return " ".join(words)


def _preferences(reward_dir: Path, rng: random.Random, count: int) -> list[dict]:
    """`count` pairs, each side scored by the gold reward model with its own template; a draw
    whose two sides score within 0.05 is drawn again (a tie teaches nothing)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(reward_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(reward_dir)).eval()
    rows: list[dict] = []
    while len(rows) < count:
        topic = rng.choice(TOPICS)
        prompt = [{"role": "user", "content": rng.choice(PROMPT_FORMS).format(topic)}]
        sides = [prompt + [{"role": "assistant", "content": _response(rng, topic)}] for _ in range(2)]
        texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in sides]
        batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        with torch.no_grad():
            a, b = model(**batch).logits[:, 0].tolist()
        if abs(a - b) < 0.05:
            continue
        chosen, rejected = (sides[0], sides[1]) if a > b else (sides[1], sides[0])
        rows.append({"id": f"pref{len(rows):05d}", "chosen": chosen, "rejected": rejected,
                     "gold_margin": round(abs(a - b), 4)})  # fmt: skip
    return rows


SFT_CONVERSATIONS = 256


def _conversations(rng: random.Random, count: int) -> list[dict]:
    """One or two user/assistant exchanges each; the answers are whole words about the topic."""
    rows = []
    for i in range(count):
        messages = []
        for _ in range(rng.randint(1, 2)):
            topic = rng.choice(TOPICS)
            messages += [{"role": "user", "content": rng.choice(PROMPT_FORMS).format(topic)},
                         {"role": "assistant", "content": _response(rng, topic)}]  # fmt: skip
        rows.append({"id": f"sft{i:04d}", "messages": messages})
    return rows


ARITHMETIC_PROMPTS = 64
SUM_FORMS = ("what is {} + {}", "tell me {} + {}", "{} + {} is what")


def _sums(rng: random.Random, count: int) -> list[dict]:
    """Sums of two digits whose total is a digit, so a one-token answer can be right."""
    rows = []
    for i in range(count):
        a = rng.randint(0, 9)
        b = rng.randint(0, 9 - a)
        rows.append({"id": f"sum{i:04d}", "messages": [{"role": "user", "content": rng.choice(SUM_FORMS).format(a, b)}],
                     "answer": str(a + b)})  # fmt: skip
    return rows


ARMO_OBJECTIVES = ("kindness", "harshness", "brevity")
ARMO_GATING_HIDDEN = 16


def _write_armo(tokenizer, folder: Path, seed: int) -> None:
    """ArmoRM's layout, tiny: the hand-wired backbone of the tiny reward model (its dim 2 holds
    the conversation's mean kind-word value at every token), three objectives read from it, a
    random gating MLP of ArmoRM's shape (3 hidden layers), the identity transform matrix."""
    import torch
    from safetensors.torch import save_file

    rm = _build_reward_model(tokenizer)  # the backbone computes the signal; its score head is left behind
    state = {k: v.contiguous() for k, v in rm.state_dict().items() if k.startswith("model.")}
    n, hidden = len(ARMO_OBJECTIVES), HIDDEN
    regression = torch.zeros(n, hidden)
    regression[0, 2] = REWARD_SCALE  # kindness: the tiny reward model's own reading
    regression[1, 2] = -REWARD_SCALE  # harshness: its opposite
    regression[2, 0] = 0.01  # brevity: a constant (dim 0 is constant after the norm)
    state["regression_layer.weight"] = regression
    state["reward_transform_matrix"] = torch.eye(n)
    generator = torch.Generator().manual_seed(seed)
    sizes = [hidden, ARMO_GATING_HIDDEN, ARMO_GATING_HIDDEN, ARMO_GATING_HIDDEN, n]
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        state[f"gating.layers.{i}.weight"] = torch.randn(b, a, generator=generator) * 0.3
        state[f"gating.layers.{i}.bias"] = torch.randn(b, generator=generator) * 0.1
    state[f"gating.layers.{len(sizes) - 2}.bias"][0] += 20.0  # the gate leans on kindness (softmax of x / 10)
    state["gating.logit_scale"] = torch.ones(1)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = _config(tokenizer)
    config.architectures = ["LlamaForRewardModelWithGating"]
    config.auto_map = {"AutoModel": "modeling_custom.LlamaForRewardModelWithGating"}  # as ArmoRM's: never run here
    config.num_objectives = n
    config.objective_names = list(ARMO_OBJECTIVES)
    config.gating_temperature = 10
    config.gating_hidden_dim = ARMO_GATING_HIDDEN
    config.gating_n_hidden = 3
    config.save_pretrained(str(folder))
