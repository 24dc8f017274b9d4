"""LongBench v1 and LongBench-E from the published jsonl files (``data/{dataset}.jsonl``, ``{dataset}_e.jsonl``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from longkit.errors import EvalError
from longkit.eval.suites import scoring
from longkit.eval.suites.base import (
    Suite,
    SuitePrompt,
    read_jsonl,
    register_suite,
    summarize_by_task,
    truncate_middle,
    use_chat,
)

# config/dataset2prompt.json (LongBench/config at main 2025-01). narrativeqa keeps its "asconcisely" typo, as in
# the original release; one later copy in the repository history (8ae23fd) spells it "as concisely".
PROMPTS = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the question asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "qasper": 'You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:',
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "multifieldqa_zh": "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答：",
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "2wikimqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "musique": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
    "passage_retrieval_en": 'Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", etc.\n\nThe answer is: ',
    "passage_retrieval_zh": '以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n答案是：',
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

# config/dataset2maxlen.json: max new tokens per dataset.
MAX_NEW_TOKENS = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64, "hotpotqa": 32,
    "2wikimqa": 32, "musique": 32, "dureader": 128, "gov_report": 512, "qmsum": 512, "multi_news": 512,
    "vcsum": 512, "trec": 64, "triviaqa": 32, "samsum": 128, "lsht": 64, "passage_count": 32,
    "passage_retrieval_en": 32, "passage_retrieval_zh": 32, "lcc": 64, "repobench-p": 64,
}  # fmt: skip

# eval.py dataset2metric.
METRICS = {
    "narrativeqa": "qa_f1", "qasper": "qa_f1", "multifieldqa_en": "qa_f1", "multifieldqa_zh": "qa_f1_zh",
    "hotpotqa": "qa_f1", "2wikimqa": "qa_f1", "musique": "qa_f1", "dureader": "rouge_zh", "gov_report": "rouge",
    "qmsum": "rouge", "multi_news": "rouge", "vcsum": "rouge_zh", "trec": "classification", "triviaqa": "qa_f1",
    "samsum": "rouge", "lsht": "classification", "passage_retrieval_en": "retrieval", "passage_count": "count",
    "passage_retrieval_zh": "retrieval_zh", "lcc": "code_sim", "repobench-p": "code_sim",
}  # fmt: skip

#: pred.py: "chat models are better off without build prompts on these tasks".
NO_CHAT = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
#: eval.py: only the first line of the prediction is scored for these few-shot tasks.
FIRST_LINE = frozenset({"trec", "triviaqa", "samsum", "lsht"})
#: The 13 datasets of LongBench-E (files ``{dataset}_e.jsonl``).
E_DATASETS = (
    "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa",
    "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
)  # fmt: skip
#: LongBench-E length buckets on the record's ``length`` (words for English, characters for Chinese).
BUCKETS = (("0-4k", 4000), ("4-8k", 8000), ("8k+", None))

FIELDS = {"input": str, "context": str, "answers": list}


def bucket(length: int) -> str:
    """LongBench-E bucket of a record length: < 4000 -> "0-4k", < 8000 -> "4-8k", else "8k+"."""
    for name, upper in BUCKETS:
        if upper is None or length < upper:
            return name
    raise AssertionError("unreachable")


def dataset_of(task: str) -> str:
    return task[:-2] if task.endswith("_e") else task


def sample_score(dataset: str, prediction: str, answers: list[str], all_classes: list[str] | None) -> float:
    """eval.py ``scorer``: first line for the few-shot tasks, then the max of the metric over the gold answers (0..1)."""
    if dataset in FIRST_LINE:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = METRICS[dataset]
    best = 0.0
    for gold in answers:
        if metric == "qa_f1":
            value = scoring.qa_f1_score(prediction, gold)
        elif metric == "qa_f1_zh":
            value = scoring.qa_f1_zh_score(prediction, gold)
        elif metric == "rouge":
            value = scoring.rouge_score(prediction, gold)
        elif metric == "rouge_zh":
            value = scoring.rouge_zh_score(prediction, gold)
        elif metric == "classification":
            value = scoring.classification_score(prediction, gold, all_classes or [])
        elif metric == "retrieval":
            value = scoring.retrieval_score(prediction, gold)
        elif metric == "retrieval_zh":
            value = scoring.retrieval_score(prediction, gold, zh=True)
        elif metric == "count":
            value = scoring.count_score(prediction, gold)
        else:
            value = scoring.code_sim_score(prediction, gold)
        best = max(best, value)
    return best


@register_suite
class LongBench(Suite):
    """LongBench v1 (21 datasets) and LongBench-E (13 datasets, ``<name>_e``) on the published jsonl files.

    Prompt: ``config/dataset2prompt.json`` filled with the record's ``context`` and ``input``; truncated in the
    middle to ``length`` tokens (first and last ``int(length/2)`` tokens, as pred.py); then wrapped in the chat
    template unless the dataset is one of trec, triviaqa, samsum, lsht, lcc, repobench-p. Max new tokens from
    ``config/dataset2maxlen.json``; samsum stops at the first newline. Score: eval.py's metric per dataset,
    max over the gold answers, first line only for trec/triviaqa/samsum/lsht; 100 x mean (2 dp).
    LongBench-E results are reported per length bucket 0-4k / 4-8k / 8k+ of the record's ``length`` field.
    Not reproduced: pred.py's samsum ``min_length`` (which only stops an immediate EOS).
    Based on LongBench (Bai et al. 2023), https://arxiv.org/abs/2308.14508.
    Data: ``DIR/{dataset}.jsonl`` or ``DIR/{dataset}_e.jsonl`` (also accepted under ``DIR/data/``), fields
    ``input, context, answers, length, all_classes, _id``.
    """

    name = "longbench"
    tasks = tuple(PROMPTS) + tuple(f"{d}_e" for d in E_DATASETS)
    paper = "LongBench: A Bilingual, Multitask Benchmark for Long Context Understanding (Bai et al. 2023) https://arxiv.org/abs/2308.14508"

    def data_file(self, data_dir: Path, task: str, length: int | None = None) -> Path:
        self.check_task(task)
        for path in (Path(data_dir) / f"{task}.jsonl", Path(data_dir) / "data" / f"{task}.jsonl"):
            if path.is_file():
                return path
        raise EvalError(f"no LongBench file for task '{task}': expected {Path(data_dir) / (task + '.jsonl')}")

    def load(self, data_dir: str | Path, task: str, length: int | None = None) -> list[dict[str, Any]]:
        path = self.data_file(Path(data_dir), task)
        required = dict(FIELDS, length=int) if task.endswith("_e") else FIELDS
        records = read_jsonl(path, required)
        for number, record in enumerate(records, 1):
            if not all(isinstance(a, str) for a in record["answers"]):
                raise EvalError(f"{path}: record {number}: field 'answers' must be a list of strings")
            if METRICS[dataset_of(task)] == "classification" and not isinstance(record.get("all_classes"), list):
                raise EvalError(f"{path}: record {number}: field 'all_classes' must be a list for {task}")
        return records

    def prompt(
        self, task: str, record: dict[str, Any], tokenizer: Any, max_length: int, chat: bool | None
    ) -> SuitePrompt:
        dataset = dataset_of(task)
        text = PROMPTS[dataset].format(context=record["context"], input=record["input"])
        text, n_full, cut = truncate_middle(tokenizer, text, max_length, style="longbench", joined=False)
        wrap = dataset not in NO_CHAT and use_chat(tokenizer, chat)
        return SuitePrompt(text, wrap, MAX_NEW_TOKENS[dataset], n_full, cut, stop_newline=dataset == "samsum")

    def answers(self, task: str, record: dict[str, Any]) -> list[str]:
        return record["answers"]

    def score(self, task: str, prediction: str, record: dict[str, Any]) -> float:
        return 100.0 * sample_score(dataset_of(task), prediction, record["answers"], record.get("all_classes"))

    def meta(self, task: str, record: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"record_id": record.get("_id")}
        if isinstance(record.get("length"), int):
            out["data_length"] = record["length"]
            if task.endswith("_e"):
                out["bucket"] = bucket(record["length"])
        return out

    def summarize(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        def buckets(rs: list[dict[str, Any]]) -> dict[str, Any]:
            if not any("bucket" in r for r in rs):
                return {}
            by = {name: [float(r["score"]) for r in rs if r.get("bucket") == name] for name, _ in BUCKETS}
            return {"buckets": {k: round(sum(v) / len(v), 2) if v else None for k, v in by.items()}}

        return summarize_by_task(records, buckets)
