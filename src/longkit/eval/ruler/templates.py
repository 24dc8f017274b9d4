"""RULER's prompt templates, answer prefixes and answer-token reserves, verbatim from NVIDIA/RULER.

Source: ``scripts/data/synthetic/constants.py`` of https://github.com/NVIDIA/RULER (Apache-2.0). The strings
are kept byte-for-byte so that a prompt built here is the prompt RULER builds; tests compare them with literal
copies. ``tokens_to_generate`` is the answer reserve that RULER subtracts from the length budget.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskTemplate:
    """A RULER task family's instruction template (with ``{context}``/``{query}``), answer prefix and reserve."""

    template: str
    answer_prefix: str
    tokens_to_generate: int


FAMILIES: dict[str, TaskTemplate] = {
    "niah": TaskTemplate(
        template=(
            "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
            "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
        ),
        answer_prefix=" The special magic {type_needle_v} for {query} mentioned in the provided text are",
        tokens_to_generate=128,
    ),
    "variable_tracking": TaskTemplate(
        template=(
            "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
            "Question: Find all variables that are assigned the value {query} in the text above."
        ),
        answer_prefix=(
            " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
            "are assigned the value {query}, they are: "
        ),
        tokens_to_generate=30,
    ),
    "common_words_extraction": TaskTemplate(
        template=(
            "Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often.\n{context}\n"
            "Question: What are the 10 most common words in the above list?"
        ),
        answer_prefix=" Answer: The top 10 words that appear most often in the list are:",
        tokens_to_generate=120,
    ),
    "freq_words_extraction": TaskTemplate(
        template=(
            "Read the following coded text and track the frequency of each coded word. Find the three most "
            "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
            "the dots '....'. What are the three most frequently appeared words in the above coded text?"
        ),
        answer_prefix=" Answer: According to the coded text above, the three most frequently appeared words are:",
        tokens_to_generate=50,
    ),
    "qa": TaskTemplate(
        template=(
            "Answer the question based on the given documents. Only give me the answer and do not output any "
            "other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on "
            "the given documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}"
        ),
        answer_prefix=" Answer:",
        tokens_to_generate=32,
    ),
}

#: The 13 tasks of RULER's ``scripts/synthetic.yaml``: family and arguments.
TASK_CONFIGS: dict[str, tuple[str, dict]] = {
    "niah_single_1": ("niah", dict(type_haystack="noise", type_needle_k="words", type_needle_v="numbers")),
    "niah_single_2": ("niah", dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers")),
    "niah_single_3": ("niah", dict(type_haystack="essay", type_needle_k="words", type_needle_v="uuids")),
    "niah_multikey_1": (
        "niah",
        dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers", num_needle_k=4),
    ),
    "niah_multikey_2": ("niah", dict(type_haystack="needle", type_needle_k="words", type_needle_v="numbers")),
    "niah_multikey_3": ("niah", dict(type_haystack="needle", type_needle_k="uuids", type_needle_v="uuids")),
    "niah_multivalue": (
        "niah",
        dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers", num_needle_v=4),
    ),
    "niah_multiquery": (
        "niah",
        dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers", num_needle_q=4),
    ),
    "vt": ("variable_tracking", dict(type_haystack="noise", num_chains=1, num_hops=4)),
    "cwe": ("common_words_extraction", dict(freq_cw=30, freq_ucw=3, num_cw=10)),
    "fwe": ("freq_words_extraction", dict(alpha=2.0)),
    "qa_1": ("qa", dict(dataset="squad")),
    "qa_2": ("qa", dict(dataset="hotpotqa")),
}

#: RULER's metric per task family (``scripts/eval/synthetic/constants.py``).
METRIC_BY_FAMILY = {
    "niah": "string_match_all",
    "variable_tracking": "string_match_all",
    "common_words_extraction": "string_match_all",
    "freq_words_extraction": "string_match_all",
    "qa": "string_match_part",
}

#: RULER's noise haystack sentence (niah_single_1, vt).
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
#: RULER's needle line.
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
#: RULER's QA document format.
DOCUMENT_PROMPT = "Document {i}:\n{document}"
