import pytest

from longkit.errors import EvalError
from longkit.eval.haystack import haystack_text, pydoc_text, token_stream
from longkit.eval.prompt import chat_frame, fit_prompt
from longkit.models import byte_tokenizer

TOK = byte_tokenizer()


def fit(length, depth=0.5, chat=True, needle=" NEEDLE SENTENCE HERE. ", text=None):
    stream = token_stream(TOK, text or pydoc_text()[:20000])
    return fit_prompt(TOK, length, stream, instruction="Find it.\n", needle=needle, depth=depth,
                      question="\nWhat is it?", answer_prefix=" It is", chat=chat)


@pytest.mark.parametrize("length", [301, 517, 1000, 2049, 30001])
@pytest.mark.parametrize("chat", [True, False])
def test_prompt_has_exactly_the_requested_length(length, chat):
    p = fit(length, chat=chat)
    assert len(p.input_ids) == length
    text = TOK.decode(p.input_ids)
    assert "NEEDLE SENTENCE HERE." in text
    assert text.endswith("What is it?<|im_end|>\n<|im_start|>assistant\n It is" if chat else "What is it? It is")
    if not chat:
        assert p.input_ids[0] == TOK.bos_token_id and TOK.bos_token_id not in p.input_ids[1:]


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.33, 0.5, 0.9])
def test_needle_goes_at_the_last_sentence_boundary_at_or_before_depth(depth):
    p = fit(3000, depth=depth)
    head, _ = chat_frame(TOK, True)
    start = len(head) + len(TOK("Find it.\n", add_special_tokens=False).input_ids)
    needle_len = len(TOK(" NEEDLE SENTENCE HERE. ", add_special_tokens=False).input_ids)
    tail_len = len(TOK("\nWhat is it?<|im_end|>\n<|im_start|>assistant\n It is", add_special_tokens=False).input_ids)
    budget = 3000 - start - needle_len - tail_len
    target = round(depth * budget)
    before = TOK.decode(p.input_ids[start : p.needle_start])
    if depth == 0.0:
        assert p.needle_start == start
        return
    assert before.rstrip(" ").endswith((".", "!", "?", "\n"))
    # no sentence ends between the chosen boundary and the target position
    after = p.input_ids[p.needle_start + needle_len : start + needle_len + target]
    assert not any(TOK.decode([t]).endswith((".", "!", "?", "\n")) for t in after[:-1])
    assert p.needle_start - start <= target


def test_needle_position_grows_with_depth():
    starts = [fit(4000, depth=d).needle_start for d in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert starts == sorted(starts) and len(set(starts)) == 5
    # depth 1.0: right before the question
    p = fit(4000, depth=1.0)
    tail = TOK.decode(p.input_ids[p.needle_start :])
    assert tail.startswith(" NEEDLE SENTENCE HERE. \nWhat is it?")


def test_haystack_repeats_when_shorter_than_the_prompt():
    p = fit(5000, text="One sentence. Two sentence. ")
    assert len(p.input_ids) == 5000


def test_too_short_and_bad_depth_are_clear_errors():
    with pytest.raises(EvalError, match=r"parameter 'length' = 50 is too short: the prompt without haystack takes \d+"):
        fit(50)
    with pytest.raises(EvalError, match=r"parameter 'depth' must be in \[0, 1\]"):
        fit(1000, depth=1.5)


def test_haystack_sources(tmp_path):
    text = pydoc_text()
    assert len(text) > 300_000
    # heading underlines are gone, but the headings stay
    assert "The \"assert\" statement\n\nAssert statements" in text
    (tmp_path / "b.txt").write_text("Second file.")
    (tmp_path / "a.txt").write_text("First file.")
    assert haystack_text(tmp_path) == "First file.\n\nSecond file."
    with pytest.raises(EvalError, match="parameter 'haystack' must be a directory"):
        haystack_text(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match="parameter 'haystack': no .txt files"):
        haystack_text(tmp_path / "empty")
