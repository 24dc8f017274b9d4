"""BABILong from the published per-length files of the HF dataset (``{"input", "question", "target"}``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from longkit.errors import EvalError
from longkit.eval.suites.base import (
    Suite,
    SuitePrompt,
    read_json_array,
    read_parquet,
    register_suite,
    summarize_by_task,
    use_chat,
)
from longkit.eval.suites.scoring import BABILONG_LABELS, babilong_compare

# babilong/prompts.py: TASK_TEMPLATE + USER_TEMPLATE.
TEMPLATE = "{instruction}\n\n{examples}\n\n{post_prompt}\n\n<context>\n{context}\n</context>\n\nQuestion: {question}"
MAX_NEW_TOKENS = 20
#: Data split names of the HF dataset; ``lengths`` in tokens map onto them (0 -> "0k", 4096 -> "4k", 2**20 -> "1M").
SPLITS = ("0k", "1k", "2k", "4k", "8k", "16k", "32k", "64k", "128k", "256k", "512k", "1M", "10M")

_PEOPLE = (
    "I will give you context with the facts about people and their locations hidden in some random text and a "
    "question. You need to answer the question based only on the information from the facts. "
    "If a person was in different locations, use the latest location the person was in to answer the question."
)
_CARRY = (
    "I will give you context with the facts about people and objects they carry, hidden in some random text "
    "and a question. You need to answer the question based only on the information from the facts."
)
_ITEMS = (
    "If a person got an item in the first location and travelled to the second location "
    "the item is also in the second location. "
    "If a person dropped an item in the first location and moved to the second location "
    "the item remains in the first location"
)
_LOCATION = "Your answer should contain only one word - location. Do not write anything else after that. "
_NO_EXPLAIN = "Do not explain your answer."
_YES_NO = "Your answer should contain only one word - $yes$ or $no$. Do not write anything else. " + _NO_EXPLAIN


def _ex(*pairs: tuple[str, str], trailing: str = "") -> str:
    return "\n".join(f"<example>\n{q}\nAnswer: {a}\n</example>" for q, a in pairs) + trailing


# babilong/prompts.py DEFAULT_PROMPTS (instruction, examples, post_prompt) for qa1..qa20, text as published.
PROMPTS: dict[str, tuple[str, str, str]] = {
    "qa1": (
        "I will give you context with the facts about positions of different persons hidden in some random text "
        "and a question. You need to answer the question based only on the information from the facts. "
        "If a person was in different locations, use the latest location to answer the question.",
        "<example>\nCharlie went to the hallway. Judith come back to the kitchen. Charlie travelled to balcony. "
        "Where is Charlie?\nAnswer: The most recent location of Charlie is balcony.\n</example>\n\n"
        "<example>\nAlan moved to the garage. Charlie went to the beach. Alan went to the shop. Rouse "
        "travelled to balcony. Where is Alan?\nAnswer: The most recent location of Alan is shop.\n</example>",
        "Always return your answer in the following format: "
        "The most recent location of ’person’ is ’location’. Do not write anything else after that.",
    ),
    "qa2": (
        "I give you context with the facts about locations and actions of different persons "
        "hidden in some random text and a question."
        "You need to answer the question based only on the information from the facts.\n" + _ITEMS + ".",
        _ex(
            (
                "Charlie went to the kitchen. Charlie got a bottle. Charlie moved to the balcony. Where is the bottle?",
                "The bottle is in the balcony.",
            ),
            (
                "Alan moved to the garage. Alan got a screw driver. Alan moved to the kitchen. Where "
                "is the screw driver?",
                "The screw driver is in the kitchen.",
            ),
        ),
        "Always return your answer in the following format: The ’item’ is in ’location’. "
        "Do not write anything else after that.",
    ),
    "qa3": (
        "I give you context with the facts about locations and actions of different persons "
        "hidden in some random text and a question. "
        "You need to answer the question based only on the information from the facts.\n" + _ITEMS + ".",
        _ex(
            (
                "John journeyed to the bedroom. Mary grabbed the apple. Mary went back to the bathroom. "
                "Daniel journeyed to the bedroom. Daniel moved to the garden. Mary travelled to the kitchen. "
                "Where was the apple before the kitchen?",
                "Before the kitchen the apple was in the bathroom.",
            ),
            (
                "John went back to the bedroom. John went back to the garden. John went back to the kitchen. "
                "Sandra took the football. Sandra travelled to the garden. Sandra journeyed to the bedroom. "
                "Where was the football before the bedroom?",
                "Before the bedroom the football was in the garden.",
            ),
        ),
        "Always return your answer in the following format: "
        "Before the $location_1$ the $item$ was in the $location_2$. Do not write anything else after that.",
    ),
    "qa4": (
        "I will give you context with the facts about different people, their location and actions, hidden in "
        "some random text and a question. "
        "You need to answer the question based only on the information from the facts.",
        _ex(
            (
                "The hallway is south of the kitchen. The bedroom is north of the kitchen. "
                "What is the kitchen south of?",
                "bedroom",
            ),
            (
                "The garden is west of the bedroom. The bedroom is west of the kitchen. What is west of the bedroom?",
                "garden",
            ),
        ),
        _LOCATION.rstrip(),
    ),
    "qa5": (
        "I will give you context with the facts about locations and their relations hidden in some random text "
        "and a question. You need to answer the question based only on the information from the facts.",
        _ex(
            (
                "Mary picked up the apple there. Mary gave the apple to Fred. Mary moved to the bedroom. "
                "Bill took the milk there. Who did Mary give the apple to?",
                "Fred",
            ),
            (
                "Jeff took the football there. Jeff passed the football to Fred. Jeff got the milk there. "
                "Bill travelled to the bedroom. Who gave the football?",
                "Jeff",
            ),
            (
                "Fred picked up the apple there. Fred handed the apple to Bill. Bill journeyed to the bedroom. "
                "Jeff went back to the garden. What did Fred give to Bill?",
                "apple",
            ),
        ),
        "Your answer should contain only one word. Do not write anything else after that. " + _NO_EXPLAIN,
    ),
    "qa6": (
        _PEOPLE,
        _ex(
            ("John travelled to the hallway. John travelled to the garden. Is John in the garden?", "yes"),
            (
                "Mary went to the office. Daniel journeyed to the hallway. Mary went to the bedroom. "
                "Sandra went to the garden. Is Mary in the office?",
                "no",
            ),
            trailing="\n",
        ),
        "Your answer should contain only one word - $yes$ or $no$. Do not write anything else after that. "
        + _NO_EXPLAIN,
    ),
    "qa7": (
        _CARRY,
        _ex(
            ("Daniel went to the bedroom. Daniel got the apple there. How many objects is Daniel carrying?", "one"),
            ("Mary grabbed the apple there. Mary gave the apple to John. How many objects is Mary carrying?", "none"),
            (
                "Sandra travelled to the hallway. Sandra picked up the milk there. Sandra took the apple there. "
                "Mary travelled to the garden. How many objects is Sandra carrying?",
                "two",
            ),
            trailing="\n",
        ),
        "Your answer should contain only one word - $none$ or $number_of_objects$. "
        "Do not write anything else after that. " + _NO_EXPLAIN,
    ),
    "qa8": (
        _CARRY,
        _ex(
            ("Sandra travelled to the garden. Mary grabbed the milk there. What is Mary carrying?", "milk"),
            (
                "Mary travelled to the kitchen. Sandra travelled to the office. John travelled to the office. "
                "Sandra discarded the milk there. What is Sandra carrying?",
                "nothing",
            ),
            (
                "Daniel grabbed the apple there. Mary went to the office. Daniel moved to the garden. "
                "Daniel grabbed the milk there. Mary went to the kitchen. What is Daniel carrying?",
                "apple,milk",
            ),
            trailing="\n",
        ),
        "Your answer should contain only one or two words: $nothing$ or $object$ or $object_1$, $object_2$. "
        "Do not write anything else. " + _NO_EXPLAIN,
    ),
    "qa9": (
        _PEOPLE,
        _ex(
            ("John is not in the bathroom. Sandra is not in the bedroom. Is John in the bathroom?", "no"),
            (
                "Mary journeyed to the kitchen. John is in the bedroom. Sandra is not in the garden. "
                "Is Mary in the kitchen?",
                "yes",
            ),
            trailing="\n",
        ),
        _YES_NO,
    ),
    "qa10": (
        _PEOPLE,
        _ex(
            ("Bill is in the kitchen. Julie is either in the school or the cinema. Is Bill in the bedroom?", "no"),
            ("Fred is in the bedroom. Mary is either in the school or the cinema. Is Mary in the school?", "maybe"),
            ("Fred is either in the kitchen or the park. Bill moved to the cinema. Is Bill in the cinema?", "yes"),
            trailing="\n<context>\n",
        ),
        "Your answer should contain only one word - $yes$ or $no$ or $maybe$. Do not write anything else. "
        + _NO_EXPLAIN,
    ),
    "qa11": (
        _PEOPLE,
        _ex(
            ("Daniel journeyed to the hallway. After that he journeyed to the garden. Where is Daniel?", "garden"),
            (
                "Mary moved to the office. Afterwards she journeyed to the kitchen. Daniel went to the hallway. "
                "Then he journeyed to the garden. Where is Mary?",
                "kitchen",
            ),
            (
                "Sandra moved to the kitchen. After that she went back to the hallway. Sandra moved to the bedroom. "
                "Then she went to the hallway. Mary moved to the bedroom. Afterwards she travelled to the bathroom. "
                "Where is Sandra?",
                "hallway",
            ),
            trailing="\n<context>\n",
        ),
        _LOCATION + _NO_EXPLAIN,
    ),
    "qa12": (
        _PEOPLE,
        _ex(
            (
                "Mary and Daniel travelled to the bathroom. John and Daniel travelled to the office. Where is Daniel?",
                "office",
            ),
            (
                "Sandra and Mary went back to the office. Daniel and Sandra went to the bedroom. Sandra and Mary "
                "travelled to the hallway. John and Mary went to the kitchen. Where is Mary?",
                "kitchen",
            ),
            (
                "Daniel and Sandra went back to the hallway. Daniel and John moved to the office. Daniel and John "
                "moved to the garden. Daniel and Mary went back to the bathroom. Daniel and John went back to the "
                "kitchen. Daniel and Sandra went to the bathroom. Where is John?",
                "kitchen",
            ),
            trailing="\n<context>\n",
        ),
        _LOCATION + _NO_EXPLAIN,
    ),
    "qa13": (
        _PEOPLE,
        _ex(
            (
                "Mary and Daniel travelled to the bathroom. Then they journeyed to the hallway. Where is Daniel?",
                "hallway",
            ),
            (
                "Daniel and Sandra travelled to the kitchen. After that they journeyed to the hallway. Mary and "
                "Daniel travelled to the bedroom. After that they travelled to the hallway. Where is Sandra?",
                "hallway",
            ),
            (
                "John and Mary moved to the bathroom. Then they travelled to the office. John and Mary went to the "
                "kitchen. Afterwards they went to the bedroom. John and Sandra moved to the bathroom. Following that "
                "they went back to the kitchen. Where is Mary?",
                "bedroom",
            ),
            trailing="\n<context>\n",
        ),
        _LOCATION + _NO_EXPLAIN,
    ),
    "qa14": (
        _PEOPLE,
        _ex(
            (
                "Bill went back to the cinema yesterday. Julie went to the school this morning. Fred went to the park "
                "yesterday. Yesterday Julie went to the office. Where was Julie before the school?",
                "office",
            ),
            (
                "This morning Fred went to the kitchen. Fred journeyed to the bedroom yesterday. Mary travelled to the "
                "bedroom this morning. Yesterday Mary went to the cinema. Where was Mary before the bedroom?",
                "cinema",
            ),
            (
                "Yesterday Julie went back to the park. Julie went to the bedroom this morning. Bill journeyed to the "
                "cinema yesterday. This morning Bill went back to the park. This evening Julie went to the school. "
                "This afternoon Julie went back to the park. Where was Julie before the bedroom?",
                "park",
            ),
            trailing="\n<context>\n",
        ),
        _LOCATION + _NO_EXPLAIN,
    ),
    "qa15": (
        "I will give you context with the facts about animals, their names and relations. The facts and a question "
        "are hidden in some random text. You need to answer the question based only on the information from the facts.",
        _ex(
            (
                "Mice are afraid of wolves. Gertrude is a mouse. Cats are afraid of sheep. Winona is a mouse. Sheep are "
                "afraid of wolves. Emily is a mouse. Jessica is a wolf. What is gertrude afraid of?",
                "wolf",
            ),
            (
                "Mice are afraid of wolves. Gertrude is a mouse. Cats are afraid of sheep. Winona is a mouse. Sheep are "
                "afraid of wolves. Emily is a mouse. Jessica is a wolf. What is jessica afraid of?",
                "cat",
            ),
            (
                "Mice are afraid of cats. Wolves are afraid of sheep. Emily is a wolf. Cats are afraid of sheep. "
                "Gertrude is a wolf. Sheep are afraid of cats. Winona is a wolf. What is emily afraid of?",
                "sheep",
            ),
            trailing="\n<context>\n",
        ),
        "Your answer should contain only one word - an animal species. Do not write anything else after that. "
        + _NO_EXPLAIN,
    ),
    "qa16": (
        "I will give you context with the facts about animals, their names and colors. The facts and a question "
        "are hidden in some random text. You need to answer the question based only on the information from the facts.",
        _ex(
            (
                "Lily is a frog. Bernhard is a frog. Bernhard is green. Brian is a lion. Brian is white. Julius is a "
                "swan. Julius is green. Lily is green. Greg is a swan. What color is Greg?",
                "green",
            ),
            (
                "Julius is a lion. Lily is a rhino. Bernhard is a swan. Lily is white. Bernhard is green. Greg is a "
                "rhino. Greg is gray. Julius is white. Brian is a lion. What color is Brian?",
                "white",
            ),
            (
                "Brian is a rhino. Julius is a lion. Bernhard is a lion. Greg is a swan. Brian is gray. Greg is white. "
                "Lily is a rhino. Bernhard is yellow. Lily is gray. What color is Julius?",
                "yellow",
            ),
            trailing="\n<context>\n",
        ),
        "Your answer should contain only one word - a color. Do not write anything else after that. " + _NO_EXPLAIN,
    ),
    "qa17": (
        "I will give you context with the facts about different figures, their location and colors, hidden in "
        "some random text and a question. You need to answer the question based only on the information from the facts.",
        # The published examples lack the newline between the second and third example.
        "<example>\nThe triangle is above the pink rectangle. The blue square is to the left of the triangle. "
        "Is the pink rectangle to the right of the blue square?\nAnswer: yes\n</example>\n"
        "<example>\nThe red sphere is to the left of the yellow square. The red sphere is below the pink rectangle. "
        "Is the pink rectangle to the left of the yellow square?\nAnswer: yes\n</example>"
        "<example>\nThe red sphere is above the pink rectangle. The red sphere is to the right of the red square. "
        "Is the pink rectangle above the red square?\nAnswer: no\n</example>",
        _YES_NO,
    ),
    "qa18": (
        "I will give you context with the facts about different objects and their sizes, hidden in "
        "some random text and a question. You need to answer the question based only on the information from the facts.",
        "<example>\nThe box of chocolates fits inside the chest. The box is bigger than the chest. The box is bigger "
        "than the suitcase. The suitcase fits inside the box. The container is bigger than the box of chocolates. "
        "Does the box fit in the box of chocolates?\nAnswer: no\n</example>\n"
        "<example>\nThe suitcase is bigger than the container. The container fits inside the box. The chest is "
        "bigger than the chocolate.The suitcase fits inside the box. The chest fits inside the box. "
        "Does the chocolate fit in the box?\nAnswer: yes\n</example>"
        "<example>\nThe chocolate fits inside the box of chocolates. The suitcase fits inside the box. The "
        "chocolate fits inside the box. The box is bigger than the box of chocolates. The suitcase is bigger than "
        "the box of chocolates. Is the chocolate bigger than the box?\nAnswer: no\n</example>",
        _YES_NO,
    ),
    "qa19": (
        "I will give you context with the facts about different places and their locations, hidden in "
        "some random text and a question. You need to answer the question based only on the information from the facts.",
        _ex(
            (
                "The office is east of the hallway. The kitchen is north of the office. The garden is west of the "
                "bedroom. The office is west of the garden. The bathroom is north of the garden. How do you go from "
                "the kitchen to the garden?",
                "s,e",
            ),
            (
                "The bedroom is west of the hallway. The office is east of the garden. The garden is north of the "
                "kitchen. The kitchen is north of the bathroom. The hallway is west of the garden. How do you go from "
                "the kitchen to the hallway?",
                "n,w",
            ),
            (
                "The bedroom is south of the hallway. The bathroom is east of the office. The kitchen is west of the "
                "garden. The garden is south of the office. The office is south of the bedroom. How do you go from "
                "the garden to the bedroom?",
                "n,n",
            ),
            trailing="\n",
        ),
        "Your answer should contain only two letters, separated by a comma - ordinal directions. You can choose "
        "the letters from $n$, $s$, $e$ and $w$. Do not write anything else after that.",
    ),
    "qa20": (
        "I will give you context with the facts about people, their locations and condition hidden in some random "
        "text and a question. You need to answer the question based only on the information from the facts. "
        "If a person was in different locations, use the latest location the person was in to answer the question.",
        _ex(
            ("Sumit is tired. Where will sumit go?", "bedroom"),
            ("Yann is hungry. Yann journeyed to the kitchen. Why did yann go to the kitchen?", "hungry"),
            (
                "Antoine is thirsty. Yann is tired. Yann went back to the bedroom. Yann picked up the pajamas there."
                "Jason is thirsty. Antoine went back to the kitchen. Why did antoine go to the kitchen?",
                "thirsty",
            ),
            trailing="\n<context>\n",
        ),
        "Your answer should contain only one word - a person condition or a place. Do not write anything else "
        "after that. " + _NO_EXPLAIN,
    ),
}

FIELDS = {"input": str, "question": str, "target": str}


def split_name(length: int) -> str:
    """Token length -> data split name: 0 -> "0k", 4096 -> "4k", 2**20 -> "1M", 10 * 2**20 -> "10M"."""
    if length >= 2**20 and length % 2**20 == 0:
        name = f"{length // 2**20}M"
    elif length % 1024 == 0:
        name = f"{length // 1024}k"
    else:
        name = str(length)
    if name not in SPLITS:
        raise EvalError(
            f"BABILong length {length} is not a data split; valid: {', '.join(SPLITS)} (e.g. --lengths 0k,4k)"
        )
    return name


def split_length(name: str) -> int:
    return int(name[:-1]) * (2**20 if name.endswith("M") else 1024)


def format_input(
    task: str, record: dict[str, Any], instruction: bool = True, examples: bool = True, post_prompt: bool = True
) -> str:
    """prompts.get_formatted_input with the task's DEFAULT_PROMPTS (each part can be switched off, as the flags)."""
    ins, ex, post = PROMPTS[task]
    return TEMPLATE.format(
        instruction=ins if instruction else "",
        examples=ex if examples else "",
        post_prompt=post if post_prompt else "",
        context=record["input"].strip(),
        question=record["question"],
    ).strip()


@register_suite
class Babilong(Suite):
    """BABILong qa1..qa20: bAbI facts hidden in PG-19 text, fixed lengths 0k..10M.

    Prompt: ``{instruction}\\n\\n{examples}\\n\\n{post_prompt}\\n\\n<context>\\n{input}\\n</context>\\n\\nQuestion:
    {question}`` with the task's published instruction, in-context examples and post-prompt (all on), one user
    turn in the chat template (on by default when the tokenizer has one), 20 new tokens. No truncation: the
    data split fixes the length, and ``lengths`` select splits (0 -> "0k", 4096 -> "4k"). Score: 100 if
    ``compare_answers`` holds: the target is the only task label in the first sentence of the lowercased output
    (labels in the question ignored; qa8's "a,b" targets match as a set).
    Based on BABILong (Kuratov et al. 2024), https://arxiv.org/abs/2406.10149.
    Data: ``DIR/{split}/{task}.{json,jsonl,parquet}``, ``DIR/{split}/{task}-*.parquet`` (the HF layout) or
    ``DIR/{task}_{split}.{json,jsonl}``; records ``{"input", "question", "target"}``.
    """

    name = "babilong"
    tasks = tuple(f"qa{i}" for i in range(1, 21))
    length_kind = "split"
    paper = "BABILong: Testing the Limits of LLMs with Long Context Reasoning-in-a-Haystack (Kuratov et al. 2024) https://arxiv.org/abs/2406.10149"

    def _candidates(self, data_dir: Path, task: str, split: str) -> list[Path]:
        base = Path(data_dir)
        paths = [base / split / f"{task}{ext}" for ext in (".json", ".jsonl", ".parquet")]
        paths += sorted((base / split).glob(f"{task}-*.parquet")) if (base / split).is_dir() else []
        paths += [base / f"{task}_{split}{ext}" for ext in (".json", ".jsonl")]
        return [p for p in paths if p.is_file()]

    def splits(self, data_dir: Path) -> list[str]:
        """The data splits present in ``data_dir`` for any task (the default lengths)."""
        return [s for s in SPLITS if any(self._candidates(data_dir, t, s) for t in self.tasks)]

    def data_file(self, data_dir: Path, task: str, length: int | None = None) -> Path:
        self.check_task(task)
        splits = [split_name(length)] if length is not None else self.splits(data_dir)
        for split in splits:
            found = self._candidates(data_dir, task, split)
            if found:
                return found[0]
        want = split_name(length) if length is not None else "<split>"
        raise EvalError(
            f"no BABILong file for task '{task}' at {want}: expected {Path(data_dir) / want / (task + '.json')}"
        )

    def load(self, data_dir: str | Path, task: str, length: int | None = None) -> list[dict[str, Any]]:
        if length is None:
            raise EvalError("BABILong needs a length (data split) to load")
        path = self.data_file(Path(data_dir), task, length)
        if path.suffix == ".parquet":
            return read_parquet(path, FIELDS)
        return read_json_array(path, FIELDS)

    def prompt(
        self, task: str, record: dict[str, Any], tokenizer: Any, max_length: int, chat: bool | None
    ) -> SuitePrompt:
        text = format_input(task, record)
        return SuitePrompt(text, use_chat(tokenizer, chat), MAX_NEW_TOKENS, len(tokenizer(text).input_ids), False)

    def answers(self, task: str, record: dict[str, Any]) -> list[str]:
        return [record["target"]]

    def score(self, task: str, prediction: str, record: dict[str, Any]) -> float:
        ok = babilong_compare(record["target"], prediction, record["question"], BABILONG_LABELS[task])
        return 100.0 if ok else 0.0

    def summarize(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        return summarize_by_task(records)
