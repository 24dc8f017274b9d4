"""Synthetic key-value retrieval documents for fine-tuning (Xiong et al. 2024, "From Artificial Needles to Real
Haystacks: Improving Retrieval Capabilities in LLMs by Finetuning on Synthetic Data", https://arxiv.org/abs/2406.19292).

The paper's "simple dictionary key-value retrieval": a prompt holding a list of dictionaries whose keys and values
are random integers, a question asking for one key's value (and the dictionary it is in), and the answer in a
fixed template. Fine-tuning on it improved retrieval in long real contexts while the format never appears there:
the skill transfers, not the wording. Here each example is a chat (the prompt as the user turn, the answer as the
assistant turn, loss on the answer only: :func:`longkit.train.data.render_chat`) sized to a number of tokens, so
that one document fills one training row (a PoSE window).

What is followed, from the official data generator (``edixiong/artificial-needles``, ``data-generation/``):

- the prompt ``prompts/dictionary/form2_unshuffled_singlesk_wtemplate.prompt`` and the answer
  ``answers/dictionary/form2_unshuffled_singlesk_wtemplate.answer``, word for word (:data:`INSTRUCTION`,
  :data:`QUESTION`, :data:`ANSWER`); dictionaries written as Python prints them, one per line, as
  ``Dictionary [i] {k: v, ...}``, named 1..n in order (``name_random: False``);
- the data settings of ``dataset/yaml/simpledict_ndicts85_34_wtemplate_ordered_5_3.yaml``: the gold dictionary has
  3 pairs, the others 3 or 4; keys and values are integers of 3 or 4 digits (the digit count drawn first, then the
  number); the gold key's place in its dictionary and the gold dictionary's place in the list are uniform;
- the chat without a system turn (the generator's Mistral-format entries: user, assistant); the model's chat
  template adds its own default system turn where it has one, as it does at evaluation.

What differs: the number of dictionaries fills the token budget (the paper fixes 85 for 4,096 Llama-2 tokens), and
the gold key and the gold value occur nowhere else as a number, neither as a key nor as a value (the reference only
redraws a pair whose key equals the gold key or whose value equals the gold value), so the answer is in the context
exactly once. Nothing here reuses the evaluation tasks' wording (passkey, needle, RULER's niah: "pass key",
"special magic number", "memorize"...), which a test checks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from longkit.errors import DataError
from longkit.train.data import Document, prompt_completion, render_chat, tokenize_document

#: The source name the documents count under (``--data kv-retrieval``).
SOURCE = "kv-retrieval"
INSTRUCTION = "Do a task using the list of dictionaries below."
QUESTION = ("Above is a list of dictionaries such that each key and value is an integer. Report the value of key "
            "{key} and the dictionary it is in. Answer in the following template:\n"
            "The value of key {key} is <fill-in-value> and it is in Dictionary [<fill-in-dictionary-name>].")
ANSWER = "The value of key {key} is {value} and it is in Dictionary [{name}]."
#: Digits of keys and of values (``subkey_size_range``, ``val_size_range``), pairs per dictionary.
KEY_DIGITS = (3, 4)
VALUE_DIGITS = (3, 4)
GOLD_DICT_SIZE = 3
DICT_SIZE = (3, 4)
#: Defaults of the ``--data kv-retrieval`` parameters (``length`` defaults to the training row length).
DEFAULT_COUNT = 256
#: Dictionaries drawn per round while filling the budget (their lines are tokenised together).
_BATCH = 16


@dataclass(frozen=True)
class KVSample:
    """One example: the chat ``messages``, the asked ``key``, its ``value``, the ``dictionary`` holding it (its name,
    1-based), how many dictionaries the prompt lists, and the :class:`~longkit.train.data.Document` to train on
    with its ``tokens`` (ids including the EOS the packer appends)."""

    messages: tuple[dict[str, str], ...]
    key: int
    value: int
    dictionary: int
    n_dicts: int
    document: Document
    tokens: int


def _number(rng: random.Random, digits: tuple[int, int]) -> int:
    n = rng.randint(*digits)
    return rng.randint(10 ** (n - 1), 10 ** n - 1)


def _dictionary(rng: random.Random, size: int, gold: tuple[int, int]) -> list[tuple[int, int]]:
    """``size`` pairs none of whose numbers is the gold key or gold value; keys distinct within the dictionary."""
    pairs: dict[int, int] = {}
    while len(pairs) < size:
        k, v = _number(rng, KEY_DIGITS), _number(rng, VALUE_DIGITS)
        if k not in gold and v not in gold and k not in pairs:
            pairs[k] = v
    return list(pairs.items())


def _line(name: int, pairs: list[tuple[int, int]]) -> str:
    # Python's own print of a dict of ints, as the reference writes str(d)
    return f"Dictionary [{name}] {{" + ", ".join(f"{k}: {v}" for k, v in pairs) + "}"


def _messages(dicts: list[list[tuple[int, int]]], key: int, value: int, gold_at: int) -> list[dict[str, str]]:
    lines = "\n".join(_line(i + 1, d) for i, d in enumerate(dicts))
    prompt = f"{INSTRUCTION}\n\n{lines}\n\n{QUESTION.format(key=key)}"
    return [{"role": "user", "content": prompt},
            {"role": "assistant", "content": ANSWER.format(key=key, value=value, name=gold_at + 1)}]


def _document(messages: list[dict[str, str]], tokenizer: Any, origin: str) -> Document:
    if getattr(tokenizer, "chat_template", None):
        text, spans = render_chat(messages, tokenizer, where=origin)
    else:
        # a base model's tokenizer without a chat template: the prompt, a blank line, the answer
        text, spans = prompt_completion(messages[0]["content"] + "\n\n", messages[1]["content"], where=origin)
    return Document(text, SOURCE, origin, spans)


def kv_sample(tokenizer: Any, length: int, rng: random.Random, *, origin: str = SOURCE) -> KVSample:
    """One example of at most ``length`` tokens (with the EOS the packer appends), filled with dictionaries to
    within about one dictionary line of ``length``; ``rng`` is consumed."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("kv-retrieval: the tokenizer has no eos_token_id")

    def size(dicts: list[list[tuple[int, int]]], gold_at: int) -> tuple[Document, int]:
        doc = _document(_messages(dicts, key, value, gold_at), tokenizer, origin)
        return doc, len(tokenize_document(doc, tokenizer, eos)[0])

    key = _number(rng, KEY_DIGITS)
    value = _number(rng, VALUE_DIGITS)
    while value == key:
        value = _number(rng, VALUE_DIGITS)
    gold = _dictionary(rng, GOLD_DICT_SIZE - 1, (key, value))
    gold.insert(rng.randrange(GOLD_DICT_SIZE), (key, value))
    _, used = size([gold], 0)
    if used > length:
        raise DataError(f"kv-retrieval: parameter 'length' = {length} is too small: the prompt with a single "
                        f"dictionary takes {used} tokens with this tokenizer")
    # Fill: each further dictionary costs about the tokens of its line and the newline before it. Lines are drawn
    # in rounds sized by the cost so far (one tokenizer call per round, usually two rounds).
    others: list[list[tuple[int, int]]] = []
    full, per_line, batch_size = False, None, _BATCH
    while not full:
        if per_line is not None:
            batch_size = max(_BATCH, int((length - used) / per_line * 1.1) + 2)
        batch = [_dictionary(rng, rng.randint(*DICT_SIZE), (key, value)) for _ in range(batch_size)]
        names = range(len(others) + 2, len(others) + 2 + batch_size)
        costs = [len(c) for c in tokenizer(["\n" + _line(n, d) for n, d in zip(names, batch, strict=True)],
                                           add_special_tokens=False)["input_ids"]]
        per_line = sum(costs) / len(costs)
        for d, cost in zip(batch, costs, strict=True):
            if used + cost > length:
                full = True
                break
            others.append(d)
            used += cost
    gold_at = rng.randint(0, len(others))
    dicts = [*others[:gold_at], gold, *others[gold_at:]]
    doc, tokens = size(dicts, gold_at)
    while tokens > length:
        # the estimate ran over (tokens merging across lines, names one digit longer): drop a dictionary after
        # the gold one if there is one, else the one just before it
        drop = len(dicts) - 1 if gold_at < len(dicts) - 1 else gold_at - 1
        del dicts[drop]
        gold_at -= drop < gold_at
        doc, tokens = size(dicts, gold_at)
    messages = tuple(_messages(dicts, key, value, gold_at))
    return KVSample(messages, key, value, gold_at + 1, len(dicts), doc, tokens)


def kv_samples(tokenizer: Any, length: int, count: int, *, seed: int = 0) -> list[KVSample]:
    """``count`` examples of at most ``length`` tokens each. Example ``i`` depends only on (``seed``, ``i``): the
    first examples of a larger count are the same, and another seed gives other examples (held-out data)."""
    for name, value, low in (("length", length, 2), ("count", count, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise DataError(f"kv-retrieval: parameter '{name}' must be an int >= {low}, got {value!r}")
    # A string seed: Python hashes it with SHA-512, the same in every process (PYTHONHASHSEED does not apply).
    return [kv_sample(tokenizer, length, random.Random(f"{SOURCE}:{seed}:{i}"), origin=f"{SOURCE}:seed={seed}#{i}")
            for i in range(count)]


def kv_retrieval(tokenizer: Any, length: int, count: int = DEFAULT_COUNT, *, seed: int = 0) -> list[Document]:
    """The documents of :func:`kv_samples` (source ``kv-retrieval``), each a chat trained on its answer only.

    Parameters:
        tokenizer: the model's tokenizer (its chat template renders the chat; without one, prompt and answer are
            joined by a blank line).
        length: int >= 2, the most tokens per document, EOS included; at least what one dictionary's prompt takes.
        count: int >= 1, how many documents.
        seed: int >= 0; another seed gives other documents (use one for held-out data).
    """
    return [s.document for s in kv_samples(tokenizer, length, count, seed=seed)]


def _int(params: dict[str, str], name: str, default: int | None) -> int | None:
    if name not in params:
        return default
    try:
        return int(params[name])
    except ValueError:
        raise DataError(f"kv-retrieval: parameter '{name}' must be a whole number, got {params[name]!r}") from None


def from_params(tokenizer: Any, row_length: int | None, params: dict[str, str]) -> list[Document]:
    """``--data kv-retrieval:length=N,count=N,seed=N``: ``length`` defaults to the training row length
    ``row_length`` and may not exceed it (a longer document would be split, its answer cut off from its
    dictionaries)."""
    if tokenizer is None:
        raise DataError("kv-retrieval: generating the documents needs the model's tokenizer")
    length = _int(params, "length", row_length)
    if length is None:
        raise DataError("kv-retrieval: parameter 'length' is needed (there is no training row length to default to)")
    if row_length is not None and length > row_length:
        raise DataError(f"kv-retrieval: parameter 'length' = {length} must be at most the training row length "
                        f"{row_length} (a longer document would be split, the answer cut off from its dictionaries)")
    return kv_retrieval(tokenizer, length, _int(params, "count", DEFAULT_COUNT), seed=_int(params, "seed", 0))


__all__ = ["ANSWER", "INSTRUCTION", "QUESTION", "SOURCE", "KVSample", "kv_retrieval", "kv_sample", "kv_samples"]
