"""Every stage tokenises a prompt and its answer the same way, as the reference does: template + " " + answer as one
text, the prompt's tokens cut off by the prompt's own token count. Checked with the toy world's byte-level tokenizer
and with a SentencePiece-style one (data/tiny-llama-sp: a '▁' prepended to the text, Metaspace pre-tokenizer, like
Llama's and Mistral's), for which tokenising " " + answer on its own gives other tokens than the model generates."""

import json

import pytest
from transformers import AutoTokenizer

import sft
from helpers import REPO, TINY_LLAMA, TOY

ROWS = [json.loads(line) for line in (TOY / "sft.jsonl").read_text().splitlines()[:300]]


@pytest.mark.parametrize(
    "tokenizer_dir", [TINY_LLAMA, REPO / "data" / "tiny-llama-sp"], ids=["byte-level", "sentencepiece-style"]
)
def test_the_answer_gets_the_tokens_it_has_after_the_prompt(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    for row in ROWS:
        prompt_text = sft.PROMPT_TEMPLATE.format(prompt=row["prompt"])
        prompt_ids, answer_ids = sft.tokenize_prompt_and_answer(tokenizer, row["prompt"], row["response"], 512)
        assert answer_ids[-1] == tokenizer.eos_token_id
        # the training sequence is exactly the tokenisation of the whole text (+ EOS): the prompt is a prefix of it
        assert prompt_ids + answer_ids[:-1] == tokenizer(prompt_text + " " + row["response"])["input_ids"]
        # a model that generates these answer tokens after the prompt writes the answer (what the rollout decodes) ...
        generated_text = tokenizer.decode(prompt_ids + answer_ids[:-1], skip_special_tokens=True)
        assert generated_text == prompt_text + " " + row["response"]
        # ... and the decoded answer, tokenised again (evaluate.py re-scores answers from their text), gives the same
        # tokens
        decoded = tokenizer.decode(answer_ids[:-1], skip_special_tokens=True).strip()
        assert sft.tokenize_prompt_and_answer(tokenizer, row["prompt"], decoded, 512) == (prompt_ids, answer_ids)


def test_tokenising_the_answer_alone_differs_for_sentencepiece_style_tokenizers():
    # the old way, " " + answer without the prompt, is what this layout replaced: harmless for byte-level BPE, wrong for
    # SentencePiece-style tokenizers (an extra '▁' token in front of every answer)
    for tokenizer_dir, differs in ((TINY_LLAMA, False), (REPO / "data" / "tiny-llama-sp", True)):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        for row in ROWS[:50]:
            _, answer_ids = sft.tokenize_prompt_and_answer(tokenizer, row["prompt"], row["response"], 512)
            alone = tokenizer(" " + row["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            assert (alone != answer_ids) == differs, (tokenizer_dir.name, row["response"])
