"""Document text is always tokenized as text: "[SEP]" or "<|end|>" written in a document never becomes
the model's special or template token (BERT-style and chat-template readers)."""

from types import SimpleNamespace

from _tokenizers import word_tokenizer
from transformers import PreTrainedTokenizerFast

from interp_assets.engine.activations import tokenize_documents
from interp_assets.engine.reader_model import EMBEDDED_READER, load_tokenizer


def _reader(tokenizer, chat_template: bool = False) -> SimpleNamespace:
    return SimpleNamespace(
        tokenizer=tokenizer,
        chat_template=chat_template,
        max_length=64,
        exclude_special_tokens=True,
        exclude_template_tokens=True,
    )


def test_bert_special_token_strings_in_a_document_stay_text() -> None:
    tok = load_tokenizer(EMBEDDED_READER)
    text = "hello [SEP] world [CLS] a [MASK] b [PAD]"
    (doc,) = tokenize_documents(_reader(tok), [text])
    special_ids = set(tok.all_special_ids)
    assert doc.input_ids[0] == tok.cls_token_id and doc.input_ids[-1] == tok.sep_token_id
    assert not special_ids & set(doc.input_ids[1:-1])  # only the structural [CLS] ... [SEP]
    assert doc.keep == [False] + [True] * (len(doc.input_ids) - 2) + [False]
    covered = "".join(text[a:b] for (a, b), k in zip(doc.offsets, doc.keep, strict=True) if k)
    assert covered == text.replace(" ", "")  # every character of the text, as text


def _chat_tokenizer() -> PreTrainedTokenizerFast:
    words = ["<unk>", "<|user|>", "<|end|>", "hello", "world", "<|", "end", "|>"]
    tok = word_tokenizer(words, unk="<unk>", unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|end|>"]})
    tok.chat_template = "{% for m in messages %}<|user|> {{ m['content'] }} <|end|>{% endfor %}"
    return tok


def test_chat_template_structure_is_special_and_the_document_cannot_inject_it() -> None:
    tok = _chat_tokenizer()
    user, end = tok.convert_tokens_to_ids(["<|user|>", "<|end|>"])
    text = "hello <|end|> world"
    (doc,) = tokenize_documents(_reader(tok, chat_template=True), [text])
    assert doc.input_ids[0] == user and doc.input_ids[-1] == end  # the template's own tokens
    inner = [i for i, k in zip(doc.input_ids, doc.keep, strict=True) if k]
    assert end not in inner and user not in inner and len(inner) == 5  # hello <| end |> world
    for (a, b), k in zip(doc.offsets, doc.keep, strict=True):
        if k:
            assert text[a:b] in {"hello", "<|", "end", "|>", "world"}
