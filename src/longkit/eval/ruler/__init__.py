"""RULER's 13 synthetic tasks, generated offline and fitted to a token budget with the model's tokenizer.

>>> from longkit.eval import ruler
>>> samples = ruler.generate("niah_single_1", tokenizer, 4096, num_samples=5)
>>> samples[0]["input"], samples[0]["answer_prefix"], samples[0]["outputs"], samples[0]["length"]

Each sample follows RULER's jsonl fields: ``index``, ``input`` (the user text: task template with context and
question), ``answer_prefix`` (appended after the chat template's assistant header, as RULER does),
``outputs`` (gold strings), ``length`` (prompt tokens + the task's ``tokens_to_generate``, <= the budget, as
RULER counts it); plus ``examples`` (cwe's worked example as a [user, assistant] turn under a chat template),
``input_tokens``, ``tokens_to_generate``, ``task``, ``label``, ``metric``, ``chat``,
``synthetic`` and ``meta``. Scores: :func:`longkit.eval.metrics.ruler_score`.

longkit follows the current official code (NVIDIA/RULER main, commit c3f5e3b, 2025: ``scripts/data/synthetic/``,
``scripts/synthetic.yaml``, ``scripts/eval/``), not the 2024 release; tests compare prompts, sizes and scores with
values computed by running that code (``tests/fixtures/ruler_official.json``). The model template is the
tokenizer's own chat template (``chat=True``) where RULER picks one of its ``template.py`` strings; cwe's worked
example is then its own user/assistant turn, as RULER's template makes it (``examples`` of a sample).

Differences from RULER, all documented where they happen: the essay haystack is public-domain prose (Python's
documentation topics) or a user directory instead of Paul Graham's essays; sentences split by a regular
expression instead of NLTK punkt; qa_1/qa_2 run on an offline synthetic dataset unless ``data=`` points to
SQuAD / HotpotQA JSON (then ``synthetic`` is False); cwe past the wonderwords vocabulary (~200K tokens) needs
RULER's ``english_words.json`` passed as ``english_words=`` (no package ships it) and fails clearly without it;
prompt tokens count what the model sees (BOS or the chat frame) where RULER counts the text's tokens; each
sample gets the largest haystack that fits (RULER searches on its first sample and steps later ones down by a
fixed increment); keys are drawn distinct and distractors never reuse a real key or gold value.
"""

from __future__ import annotations

from typing import Any

from longkit.errors import EvalError
from longkit.eval.metrics import RULER_METRICS
from longkit.eval.ruler.common_words import CWEBuilder, CWEConfig
from longkit.eval.ruler.fit import Draft, Frame, fit_size
from longkit.eval.ruler.freq_words import FWEBuilder, FWEConfig
from longkit.eval.ruler.niah import NiahBuilder, NiahConfig
from longkit.eval.ruler.qa import QABuilder, read_hotpotqa, read_squad, synthetic_qa
from longkit.eval.ruler.templates import FAMILIES, TASK_CONFIGS
from longkit.eval.ruler.variable_tracking import VTBuilder, VTConfig, icl_example
from longkit.eval.ruler.words import essay_words

#: RULER's 13 tasks in the order of its tables.
TASKS: list[str] = list(TASK_CONFIGS)

_CONFIGS = {
    "niah": NiahConfig,
    "variable_tracking": VTConfig,
    "common_words_extraction": CWEConfig,
    "freq_words_extraction": FWEConfig,
}
_GENERAL = {"tokens_to_generate", "data"}


def family(task: str) -> str:
    if task not in TASK_CONFIGS:
        raise EvalError(f"unknown RULER task '{task}'; valid tasks: {', '.join(TASKS)}")
    return TASK_CONFIGS[task][0]


def _config(task: str, options: dict[str, Any]) -> tuple[str, Any, dict[str, Any]]:
    fam, args = TASK_CONFIGS[task]
    general = {k: v for k, v in options.items() if k in _GENERAL}
    rest = {k: v for k, v in options.items() if k not in _GENERAL}
    if fam == "qa":
        if rest:
            raise EvalError(f"unknown option(s) {sorted(rest)} for RULER task '{task}'; valid: {sorted(_GENERAL)}")
        return fam, dict(args), general
    cls = _CONFIGS[fam]
    valid = set(cls.__dataclass_fields__)
    unknown = set(rest) - valid
    if unknown:
        raise EvalError(
            f"unknown option(s) {sorted(unknown)} for RULER task '{task}'; valid: {sorted(valid | _GENERAL)}"
        )
    if "data" in general:
        raise EvalError(f"option 'data' only applies to qa_1 / qa_2, not '{task}'")
    merged = {k: v for k, v in args.items() if k in valid} | rest
    return fam, cls(**merged), general


class RulerGenerator:
    """The sample generator of one RULER task, bound to a tokenizer and run settings: ``sample(length, index)``.

    The runner's task (what ``--task niah_single_1`` names, scored into records) is
    :class:`longkit.eval.tasks.ruler.Ruler`; this class only builds its samples.
    """

    def __init__(
        self,
        task: str,
        tokenizer: Any,
        *,
        seed: int = 0,
        chat: bool = False,
        haystack: str | None = None,
        **options: Any,
    ):
        self.task, self.seed, self.haystack = task, seed, haystack
        self.family = family(task)
        self.fam, self.cfg, general = _config(task, options)
        if self.fam != "qa":
            # Bad arguments fail here, before any sample (or vt's one-shot example) is drawn.
            self.cfg.validate()
        reserve = general.get("tokens_to_generate", FAMILIES[self.fam].tokens_to_generate)
        if not 0 <= int(reserve) <= 100_000:
            raise EvalError(f"parameter 'tokens_to_generate' must be in [0, 100000] (got {reserve!r})")
        self.tokens_to_generate = int(reserve)
        self.frame = Frame(tokenizer, chat)
        self.data = general.get("data")
        self.synthetic = self.fam == "qa" and self.data is None
        self.label = f"{task} (synthetic)" if self.synthetic else task
        self._icl: str | None = None

    def _essay(self) -> tuple[str, ...] | None:
        needs = getattr(self.cfg, "type_haystack", None) == "essay"
        return essay_words(self.haystack) if needs else None

    def _builder(self, length: int, index: int) -> Any:
        sample_seed = f"{self.seed}|{self.task}|{length}|{index}"
        if self.fam == "niah":
            return NiahBuilder(NiahConfig(**vars(self.cfg)), sample_seed, self.seed, self._essay())
        if self.fam == "variable_tracking":
            if self._icl is None:
                self._icl = icl_example(self.frame, self.cfg, self.seed, self._essay())
            return VTBuilder(self.cfg, sample_seed, self._icl, self._essay())
        if self.fam == "common_words_extraction":
            return CWEBuilder(self.cfg, sample_seed, self.seed, length)
        if self.fam == "freq_words_extraction":
            return FWEBuilder(self.cfg, sample_seed, self.seed, length, self.tokens_to_generate)
        dataset = self.cfg["dataset"]
        if self.data is None:
            items, docs = synthetic_qa(self.seed, hops=1 if dataset == "squad" else 2)
        elif dataset == "squad":
            items, docs = read_squad(str(self.data))
        else:
            items, docs = read_hotpotqa(str(self.data))
        return QABuilder(items, docs, index, sample_seed, self.seed)

    def sample(self, length: int, index: int) -> dict[str, Any]:
        if int(length) < 1:
            raise EvalError(f"parameter 'length' must be a positive token count (got {length!r})")
        builder = self._builder(int(length), index)
        if hasattr(builder, "fit"):
            # fwe sizes its text with RULER's own coarse steps, not the binary search.
            draft, n_tokens, _ = builder.fit(self.frame.count)
            return self._record(draft, n_tokens, index)
        draft, n_tokens, size = fit_size(
            builder.build,
            self.frame,
            int(length),
            self.tokens_to_generate,
            min_size=builder.min_size,
            max_size=getattr(builder, "max_size", None),
            task=self.task,
        )
        if hasattr(builder, "check_fit"):
            builder.check_fit(size, n_tokens, int(length) - self.tokens_to_generate, self.frame.count)
        return self._record(draft, n_tokens, index)

    def _record(self, draft: Draft, n_tokens: int, index: int) -> dict[str, Any]:
        return {
            "index": index,
            "task": self.task,
            "label": self.label,
            "input": self.frame.user_text(draft),
            "answer_prefix": draft.answer_prefix,
            # Worked examples as turns of their own (chat template only; otherwise they open ``input``).
            "examples": [list(e) for e in draft.examples] if self.frame.turns else [],
            "outputs": draft.outputs,
            "length": n_tokens + self.tokens_to_generate,
            "input_tokens": n_tokens,
            "tokens_to_generate": self.tokens_to_generate,
            "metric": RULER_METRICS[self.fam],
            "chat": self.frame.chat,
            "synthetic": self.synthetic,
            "meta": draft.meta,
            "context": draft.context,
        }

    def input_ids(self, sample: dict[str, Any]) -> list[int]:
        """The prompt's token ids (example turns, chat head + input + chat tail + answer prefix):
        ``sample["input_tokens"]`` long."""
        return self.frame.ids(sample["input"], sample["answer_prefix"], [tuple(e) for e in sample.get("examples", [])])


def generate(
    task: str,
    tokenizer: Any,
    length: int,
    num_samples: int,
    seed: int = 0,
    *,
    chat: bool = False,
    haystack: str | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """``num_samples`` samples of RULER task ``task`` fitted to ``length`` tokens (answer reserve included).

    ``chat``: count the tokenizer's chat template around the user text (the answer prefix follows it).
    ``haystack``: directory of ``.txt`` files for the essay haystack (default: Python's documentation topics).
    ``options``: RULER's task arguments to override (e.g. ``num_needle_k=8``, ``type_haystack="noise"``,
    ``num_hops=8``, ``alpha=2.5``, ``tokens_to_generate=64``) and, for qa_1/qa_2, ``data=`` a SQuAD /
    HotpotQA JSON file; for cwe, ``english_words=`` RULER's ``english_words.json`` (needed past ~200K tokens).
    Sample ``i`` depends only on (seed, task, length, i).
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise EvalError(f"parameter 'num_samples' must be an integer >= 1 (got {num_samples!r})")
    generator = RulerGenerator(task, tokenizer, seed=seed, chat=chat, haystack=haystack, **options)
    return [generator.sample(length, i) for i in range(num_samples)]


__all__ = ["TASKS", "RulerGenerator", "family", "generate"]
