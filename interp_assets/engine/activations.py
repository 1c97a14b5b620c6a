"""The activation engine: read documents with the reader model, encode the hooked layer with the SAE.

Design points (see README, "Activation engine"):
- the forward pass stops at the hooked layer (a hook raises `_StopForward`): no later layers, no head;
  a plain BertModel (the embedded default) runs `interp_assets.engine.bert_forward` instead, the same math on
  real tokens only;
- documents are sorted by token length and batched by a token budget (padding is bounded);
- the SAE output stays sparse on the device: for TopK SAEs only `k` values per token ever exist, and
  for other architectures the dense pre-activations exist on the device one chunk of tokens at a time;
- special tokens (CLS/SEP/BOS) and chat-template tokens are excluded by default;
- one failing document is reported with its reason and never takes its batch down.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from interp_assets.conversations import Conversation
from interp_assets.engine.allocator import Workspace, own_mappings, transient_heap
from interp_assets.engine.bert_forward import BertForward, supports_bert_forward

ACTIVATION_COLUMNS = ("doc_index", "token_index", "token", "char_start", "char_end", "feature", "activation")

# How activation values are stored. float16 keeps ~3 significant digits (relative error <= 2**-11), which is
# more than pooling, thresholds and highlighting need and halves the bytes per nonzero; float32 is exact.
ACTIVATION_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}
FLOAT16_MAX = 65504.0

# Bound on the dense (tokens x d_sae) pre-activation block that exists on the device at one time.
_PRE_ACTIVATION_BYTES = 64 * 2**20


class _StopForward(Exception):
    """Raised by the layer hook once the hooked hidden state is captured."""


@dataclass
class EncodedTexts:
    """Sparse SAE activations for a list of texts (row = one nonzero) plus per-document status."""

    activations: pa.Table
    n_tokens: np.ndarray  # tokens read by the model (special tokens included), per document
    pooled_tokens: np.ndarray  # tokens eligible for pooling, per document
    truncated: np.ndarray  # bool per document
    errors: dict[int, str] = field(default_factory=dict)  # doc_index -> reason
    # document embeddings made from the same forward pass (`encode_texts`), when asked for: layer (as
    # `engine.documents.document_embeddings` takes it: the hook's hidden-state index, None for the last)
    # -> doc_index -> embedding
    document_embeddings: dict[int | None, dict[int, np.ndarray]] = field(default_factory=dict)


@dataclass
class _Tokenized:
    input_ids: list[int]
    offsets: list[tuple[int, int]]
    keep: list[bool]  # token is pooled (not special, not template)
    truncated: bool


def sparse_encode(sae: Any, x: Any, workspace: Workspace | None = None) -> tuple[Any, Any, Any]:
    """Encode hidden states `x` [tokens, d_in] with a SAELens SAE, returning sparse (row, feature, value).

    Results equal `sae.encode(x)`'s nonzeros; TopK, standard (ReLU) and JumpReLU SAEs are computed without
    a dense tokens x d_sae output (the pre-activations of one chunk of tokens at a time, in `workspace`
    buffers when given); other architectures fall back to `sae.encode` one chunk at a time.
    All three tensors stay on the device of `x`.
    """
    import torch

    arch = sae.cfg.architecture()
    d_sae = int(sae.cfg.d_sae)
    chunk = max(1, _PRE_ACTIVATION_BYTES // (4 * d_sae))
    workspace = workspace or Workspace()
    # out= buffers need a no-grad context (SAE weights require grad); a plain call may come with grad on
    buffered = torch.is_inference_mode_enabled() or not torch.is_grad_enabled()
    rows, feats, vals = [], [], []
    for start in range(0, x.shape[0], chunk):
        xc = x[start : start + chunk]
        if arch in ("topk", "standard", "jumprelu"):
            w_enc, b_enc = workspace.derived(("sae_encoder", id(sae)), lambda: encoder_weights(sae))
            sae_in = sae.process_sae_in(xc)
            out = workspace.get("sae_pre", xc.shape[0], d_sae, sae_in) if buffered else None
            pre = torch.addmm(b_enc, sae_in, w_enc, out=out)
        if arch == "topk":
            k = min(int(sae.cfg.k), d_sae)
            top_vals, top_idx = torch.topk(pre, k=k, dim=-1, sorted=False)
            top_vals = top_vals.relu()
            mask = top_vals > 0
            r = torch.arange(xc.shape[0], device=x.device).unsqueeze(1).expand_as(top_idx)[mask]
            f, v = top_idx[mask], top_vals[mask]
        else:
            if arch == "standard":
                acts = pre.relu_()
            elif arch == "jumprelu":
                acts = pre.masked_fill_(pre <= sae.threshold, 0.0).relu_()
            else:
                acts = sae.encode(xc)
            nz = acts.nonzero(as_tuple=True)
            r, f = nz[0], nz[1]
            v = acts[nz]
            del acts
        rows.append(r + start)
        feats.append(f)
        vals.append(v)
    if not rows:
        empty = torch.zeros(0, dtype=torch.long, device=x.device)
        return empty, empty, torch.zeros(0, dtype=torch.float32, device=x.device)
    return torch.cat(rows), torch.cat(feats), torch.cat(vals)


def encoder_weights(sae: Any) -> tuple[Any, Any]:
    """`(W_enc, b_enc)` of `sae`, with a TopK SAE's decoder-norm rescaling folded into them.

    `(x @ W_enc + b_enc) * |W_dec|` is `x @ (W_enc * |W_dec|) + b_enc * |W_dec|`: one pass over the
    tokens x d_sae pre-activations instead of two.
    """
    import torch

    if not (sae.cfg.architecture() == "topk" and getattr(sae.cfg, "rescale_acts_by_decoder_norm", False)):
        return sae.W_enc, sae.b_enc
    with torch.no_grad():
        norm = sae.W_dec.norm(dim=-1)
        return (sae.W_enc * norm).contiguous(), sae.b_enc * norm


def tokenize_documents(reader: Any, texts: Sequence[str]) -> list[_Tokenized | str]:
    """Tokenize each text (truncating to `max_length`); a failure becomes an error string for that text.

    When the SAE was trained with a BOS token first (`reader.prepend_bos`), each document starts with the
    tokenizer's BOS (added unless the tokenizer or chat template already put it there): the model reads it,
    it is never pooled.
    """
    out = _tokenize_all(reader, texts)
    if not getattr(reader, "prepend_bos", False):
        return out
    bos = reader.tokenizer.bos_token_id
    return [t if isinstance(t, str) else _with_bos(t, bos, reader.max_length) for t in out]


def _with_bos(t: _Tokenized, bos: int, max_length: int) -> _Tokenized:
    if t.input_ids and t.input_ids[0] == bos:
        return t
    ids, offsets, keep = [bos, *t.input_ids], [(0, 0), *t.offsets], [False, *t.keep]
    truncated = t.truncated or len(ids) > max_length
    return _Tokenized(ids[:max_length], offsets[:max_length], keep[:max_length], truncated)


def _tokenize_all(reader: Any, texts: Sequence[str]) -> list[_Tokenized | str]:
    tok = reader.tokenizer
    if reader.chat_template:
        return [_tokenize_chat(reader, t) for t in texts]
    texts = [str(t) for t in texts]  # a conversation without a chat template is read as its transcript
    try:
        enc = tok(
            list(texts),
            truncation=True,
            max_length=reader.max_length,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
            split_special_tokens=True,  # "[SEP]" written in a document is text, never structure
        )
    except Exception:  # noqa: BLE001 - fall back to one document at a time to isolate the bad one
        return [_tokenize_one(reader, t) for t in texts]
    out: list[_Tokenized | str] = []
    for i in range(len(texts)):
        ids = enc["input_ids"][i]
        special = enc["special_tokens_mask"][i]
        keep = [not (reader.exclude_special_tokens and s) for s in special]
        overflow = len(enc.encodings[i].overflowing) > 0 if enc.encodings else False
        out.append(_Tokenized(ids, [tuple(o) for o in enc["offset_mapping"][i]], keep, overflow))
    return out


def _tokenize_one(reader: Any, text: str) -> _Tokenized | str:
    try:
        if not isinstance(text, str):
            return f"text is {type(text).__name__}, not a string"
        enc = reader.tokenizer(
            text,
            truncation=True,
            max_length=reader.max_length,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
            split_special_tokens=True,
        )
        keep = [not (reader.exclude_special_tokens and s) for s in enc["special_tokens_mask"]]
        overflow = len(enc.encodings[0].overflowing) > 0 if enc.encodings else False
        return _Tokenized(enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]], keep, overflow)
    except Exception as exc:  # noqa: BLE001
        return f"tokenization failed: {type(exc).__name__}: {exc}"


def _tokenize_chat(reader: Any, text: str) -> _Tokenized | str:
    """Wrap `text` as one message of `reader.chat_role` ("user", or "assistant" after a blank user turn);
    offsets are made relative to `text`, template tokens marked. A `Conversation` goes through the template
    turn by turn: the tokens of `reader.chat_role`'s turns are kept (offsets into its transcript), the other
    turns are read as context only.

    The template around the text is tokenized with its special tokens; the text itself always as text
    (`split_special_tokens`), so a document cannot inject template structure such as `<|eot_id|>`.
    """
    try:
        tok = reader.tokenizer
        role = getattr(reader, "chat_role", "user")
        if isinstance(text, Conversation):  # every turn through the template; the role's turns are read
            messages = list(text.messages)
            spans = list(text.spans)
            read = [m["role"] == role for m in messages]
        elif role == "assistant":  # answering a (blank) user turn
            messages = [{"role": "user", "content": ""}, {"role": "assistant", "content": text}]
            spans, read = [(0, 0), (0, len(text))], [False, True]
        else:
            messages = [{"role": "user", "content": text}]
            spans, read = [(0, len(text))], [True]
        templated = tok.apply_chat_template(messages, tokenize=False)
        # cut the templated string into template pieces and turn contents, each content found in order
        pieces: list[tuple[str, int | None]] = []  # (piece, turn index for a content, None for template)
        at = 0
        for turn, message in enumerate(messages):
            content = message["content"]
            if not content:
                continue
            start = templated.find(content, at)
            if start < 0:
                return f"chat template does not contain turn {turn}'s text verbatim"
            pieces += [(templated[at:start], None), (content, turn)]
            at = start + len(content)
        pieces.append((templated[at:], None))
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        keep: list[bool] = []
        for piece, turn in pieces:
            if not piece:
                continue
            enc = tok(
                piece,
                add_special_tokens=False,
                return_offsets_mapping=True,
                return_special_tokens_mask=True,
                split_special_tokens=turn is not None,  # document text is always text, never structure
            )
            base = spans[turn][0] if turn is not None else 0
            for token, (a, b), special in zip(
                enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"], strict=True
            ):
                inside = turn is not None and read[turn] and b > a
                ids.append(token)
                offsets.append((base + a, base + b) if inside else (0, 0))
                context_turn = turn is not None and not read[turn]  # another role's turn: context only
                keep.append(
                    not (reader.exclude_special_tokens and special)
                    and not context_turn
                    and (inside or not reader.exclude_template_tokens)
                )
        truncated = len(ids) > reader.max_length
        if truncated:
            ids, offsets, keep = (
                ids[: reader.max_length],
                offsets[: reader.max_length],
                keep[: reader.max_length],
            )
        return _Tokenized(ids, offsets, keep, truncated)
    except Exception as exc:  # noqa: BLE001
        return f"chat template failed: {type(exc).__name__}: {exc}"


# What one more forward pass costs, in tokens of compute: the per-batch work that does not scale with its
# size (op dispatch through every layer, the SAE encode's setup, host copies). Batching trades it for padding.
BATCH_COST_TOKENS = 128


def plan_batches(
    lengths: Sequence[int], token_budget: int, batch_cost_tokens: int = BATCH_COST_TOKENS
) -> list[list[int]]:
    """Group document indices into batches of length-sorted documents, at most `token_budget` padded tokens.

    The grouping minimizes the total padded tokens plus `batch_cost_tokens` per batch (an exact dynamic
    program over the sorted lengths), so documents of similar length share a batch, no batch carries more
    padding than a separate forward pass would cost, and the cost per document does not depend on how many
    documents are encoded together (a small incremental drop is not packed into wide, mostly-padding
    batches). A document longer than the budget gets a batch of its own.
    """
    order = np.argsort(np.asarray(lengths, dtype=np.int64), kind="stable")
    ln = np.asarray(lengths, dtype=np.int64)[order]
    n = len(ln)
    best = np.zeros(n + 1, dtype=np.float64)  # best[j]: cost of batching the j shortest documents
    cut = np.zeros(n + 1, dtype=np.int64)  # cut[j]: where the last batch of that best plan starts
    for j in range(1, n + 1):
        longest = int(ln[j - 1])
        lo = max(0, j - max(1, token_budget // max(longest, 1)))
        starts = np.arange(lo, j)
        cost = best[lo:j] + batch_cost_tokens + longest * (j - starts)
        k = int(np.argmin(cost))
        best[j], cut[j] = cost[k], lo + k
    batches: list[list[int]] = []
    j = n
    while j > 0:
        batches.append(order[cut[j] : j].tolist())
        j = int(cut[j])
    return batches[::-1]


_FALLBACK_FORWARD_LOCK = threading.Lock()


def _capture_hidden(reader: Any, input_ids: Any, attention_mask: Any) -> Any:
    """Run the model up to the hooked layer and return its hidden state [B, T, d].

    Serialized per reader: the hook is registered on the shared model, so two threads' forward passes
    must not overlap (one's hook would fire for the other's batch).
    """
    with getattr(reader, "forward_lock", _FALLBACK_FORWARD_LOCK):
        return _capture_hidden_unlocked(reader, input_ids, attention_mask)


def _capture_hidden_unlocked(reader: Any, input_ids: Any, attention_mask: Any) -> Any:
    import torch

    captured: dict[str, Any] = {}
    module = reader.layer_module

    if reader.hook.position == "post":

        def hook(_mod: Any, _inp: Any, output: Any) -> None:
            captured["h"] = output[0] if isinstance(output, tuple) else output
            raise _StopForward

        handle = module.register_forward_hook(hook)
    else:

        def pre_hook(_mod: Any, args: Any, kwargs: Any) -> None:
            captured["h"] = args[0] if args else kwargs["hidden_states"]
            raise _StopForward

        handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            reader.model(input_ids=input_ids, attention_mask=attention_mask)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "h" not in captured:
        raise RuntimeError("The hooked layer was never reached during the forward pass.")
    return captured["h"]


def _vocab_strings(reader: Any) -> np.ndarray:
    cached = getattr(reader, "_vocab_strings", None)
    if cached is None:
        size = max(len(reader.tokenizer), int(getattr(reader.model.config, "vocab_size", 0) or 0))
        tokens = reader.tokenizer.convert_ids_to_tokens(list(range(size)))
        cached = np.array([t if t is not None else "" for t in tokens], dtype=object)
        reader._vocab_strings = cached
    return cached


def _batch_arrays(docs: list[_Tokenized], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded (input_ids, attention_mask, keep) arrays [batch, longest] for one batch, built at once."""
    lengths = np.array([len(d.input_ids) for d in docs], dtype=np.int64)
    real = np.arange(int(lengths.max())) < lengths[:, None]
    ids = np.full(real.shape, pad_id, dtype=np.int64)
    ids[real] = np.fromiter((t for d in docs for t in d.input_ids), dtype=np.int64, count=int(lengths.sum()))
    keep = np.zeros(real.shape, dtype=bool)
    keep[real] = np.fromiter((k for d in docs for k in d.keep), dtype=bool, count=int(lengths.sum()))
    return ids, real.astype(np.int64), keep


def _bert_forward(reader: Any, workspace: Workspace, through_last: bool = False) -> BertForward | None:
    """The fused BERT forward for the reader's model and hook, or None when the model needs the hooked one;
    `through_last`: one that can also carry the pass on to the document embeddings.

    Built once per workspace (one `encode_texts` call) from the weights as they are then: a reader whose
    model or weights change between calls is never served a stale copy.
    """
    model, hook = reader.model, reader.hook

    def build() -> BertForward | None:
        if not supports_bert_forward(model):
            return None
        return BertForward(model, hook.layer, hook.position, through_last=through_last)

    return workspace.derived(("bert_forward", id(model), hook.layer, hook.position, through_last), build)


def embeds_documents(reader: Any) -> bool:
    """Whether `encode_texts` can also give document embeddings for the reader: its model runs the fused
    BERT forward and reads each text as the document embedding does (no chat template, no added BOS)."""
    plain = not reader.chat_template and not getattr(reader, "prepend_bos", False)
    return plain and supports_bert_forward(reader.model)


def _pad_id(reader: Any) -> int:
    pad_id = reader.tokenizer.pad_token_id
    return pad_id if pad_id is not None else (reader.tokenizer.eos_token_id or 0)


def document_batch(reader: Any, texts: Sequence[str]) -> tuple[Any, Any, Any]:
    """(input_ids, attention_mask, keep) tensors [batch, longest] for `texts`, tokenized exactly as the
    engine reads them (BOS, chat template, truncation); `keep` marks the tokens the SAE reads and pools.
    Raises ValueError naming the first text that does not tokenize."""
    import torch

    docs = tokenize_documents(reader, texts)
    for i, d in enumerate(docs):
        if isinstance(d, str):
            raise ValueError(f"text {i} ({texts[i][:60]!r}...) cannot be read: {d}")
    ids, mask, keep = _batch_arrays(docs, _pad_id(reader))  # type: ignore[arg-type]
    return torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(keep)


def _encode_batch(
    reader: Any, docs: list[_Tokenized], workspace: Workspace, embed: bool = False
) -> tuple[np.ndarray, ...]:
    """Forward one padded batch; return numpy arrays (batch_row, token_index, token_id, feature, value), and
    with `embed` (`embeds_documents(reader)` must hold) the batch's document embeddings [batch, d] at the
    hook and at the last layer after them."""
    import torch

    ids_np, mask_np, keep_np = _batch_arrays(docs, _pad_id(reader))
    device = reader.device
    ids = torch.from_numpy(ids_np).to(device)
    mask = torch.from_numpy(mask_np).to(device)
    keep = torch.from_numpy(keep_np).to(device)
    fused = _bert_forward(reader, workspace, through_last=embed)
    embedded: tuple[np.ndarray, ...] = ()
    # Every tensor of the forward pass and the SAE encode dies in this block: serve them from the heap.
    with transient_heap():
        if embed:
            x, *pooled = fused.with_document_embeddings(ids, mask, keep, workspace)
            # the document embedding recipe's last step (`engine.documents.document_embeddings`)
            pooled = [torch.nn.functional.normalize(p.float(), p=2, dim=1) for p in pooled]
            with own_mappings():
                embedded = tuple(p.cpu().numpy().copy() for p in pooled)
        elif fused is not None:
            x = fused(ids, mask, keep, workspace)
        else:
            x = _capture_hidden(reader, ids, mask)[keep]
        positions = keep.nonzero(as_tuple=False)  # [n_kept, 2] (row, token_index)
        with torch.inference_mode():
            rows, feats, vals = sparse_encode(reader.sae, x, workspace)
        del x
        batch_row = positions[rows, 0]
        token_index = positions[rows, 1]
        token_id = ids[batch_row, token_index]
    # The copies that outlive the batch get their own mappings (see interp_assets.engine.allocator).
    with own_mappings():
        return (
            batch_row.cpu().numpy().astype(np.int32),
            token_index.cpu().numpy().astype(np.int32),
            token_id.cpu().numpy().astype(np.int64),
            feats.cpu().numpy().astype(np.int32),
            vals.float().cpu().numpy().astype(np.float32),
            *embedded,
        )


def encode_texts(
    reader: Any,
    texts: Sequence[str],
    on_batch: Callable[[int], None] | None = None,
    document_embedding_max_length: int | None = None,
) -> EncodedTexts:
    """Encode `texts` with the reader's model and SAE; rows of the result carry `doc_index` into `texts`.

    `on_batch(n)` (if given) hears after each forward batch how many of `texts` are done. With
    `document_embedding_max_length` (the `max_length` of `engine.documents.document_embeddings`), where
    `embeds_documents(reader)`, the same forward pass gives the document embeddings (mean-pooled, unit
    length) at the SAE's hook and, carried on through the model's last block, at the last layer, of every
    text read whole within that many tokens, as `document_embeddings` would from its own pass (to float
    rounding): the blocks up to the hook are computed once for all three."""
    tokenized = tokenize_documents(reader, texts)
    embed = document_embedding_max_length is not None and embeds_documents(reader)
    n = len(texts)
    errors: dict[int, str] = {}
    n_tokens = np.zeros(n, dtype=np.int32)
    pooled = np.zeros(n, dtype=np.int32)
    truncated = np.zeros(n, dtype=bool)
    good: list[int] = []
    for i, t in enumerate(tokenized):
        if isinstance(t, str):
            errors[i] = t
        elif len(t.input_ids) == 0:
            errors[i] = "document has no tokens"
        else:
            good.append(i)
            n_tokens[i] = len(t.input_ids)
            pooled[i] = sum(t.keep)
            truncated[i] = t.truncated
    parts: list[tuple[np.ndarray, ...]] = []
    embeddings: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # doc_index -> (at the hook, last layer)
    workspace = Workspace()
    finished = n - len(good)  # documents that failed tokenization are done already
    for batch in plan_batches([n_tokens[i] for i in good], reader.token_budget):
        doc_idx = [good[j] for j in batch]
        found = embeddings if embed else None
        parts.extend(_encode_with_isolation(reader, doc_idx, tokenized, errors, workspace, found))
        finished += len(doc_idx)
        if on_batch is not None:
            on_batch(finished)
    if activation_dtype(reader) == "float16":
        parts = [_reject_float16_overflow(p, errors) for p in parts]
    # the texts read exactly as the document embedding reads them: plain text, whole, within its max_length
    longest = document_embedding_max_length or 0
    whole = {i for i in good if isinstance(texts[i], str) and not truncated[i] and n_tokens[i] <= longest}
    return EncodedTexts(
        activations=_activation_table(reader, parts, tokenized),
        n_tokens=n_tokens,
        pooled_tokens=pooled,
        truncated=truncated,
        errors=errors,
        document_embeddings=_by_layer(reader, embeddings, whole - set(errors)) if embed else {},
    )


def hook_hidden_index(hook: Any) -> int:
    """The hidden-state index (0 = embeddings, i = output of block i - 1) a hook point reads: block L's
    output (`post`) is index L + 1, its input (`pre`) index L."""
    return hook.layer + (1 if hook.position == "post" else 0)


def _by_layer(
    reader: Any, embeddings: dict[int, tuple[np.ndarray, np.ndarray]], wanted: set[int]
) -> dict[int | None, dict[int, np.ndarray]]:
    """`EncodedTexts.document_embeddings` of the documents in `wanted`: at the hook and at the last layer."""
    at_hook = hook_hidden_index(reader.hook)
    return {
        at_hook: {i: v[0] for i, v in embeddings.items() if i in wanted},
        None: {i: v[1] for i, v in embeddings.items() if i in wanted},
    }


def _encode_with_isolation(
    reader: Any,
    doc_idx: list[int],
    tokenized: list[Any],
    errors: dict[int, str],
    workspace: Workspace,
    embeddings: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
) -> list[tuple[np.ndarray, ...]]:
    """Encode a batch; if it fails, retry each document alone so only the bad one is rejected. With
    `embeddings`, the batch's document embeddings (at the hook, last layer) are added to it (by doc_index)."""
    try:
        docs = [tokenized[i] for i in doc_idx]
        out = _encode_batch(reader, docs, workspace, embed=embeddings is not None)
        b_row, tok_i, tok_id, feat, val = out[:5]
        if embeddings is not None:
            embeddings.update(zip(doc_idx, zip(out[5], out[6], strict=True), strict=True))
        return [(np.asarray(doc_idx, dtype=np.int32)[b_row], tok_i, tok_id, feat, val)]
    except Exception as exc:  # noqa: BLE001
        if len(doc_idx) == 1:
            errors[doc_idx[0]] = f"model error: {type(exc).__name__}: {str(exc)[:300]}"
            return []
        out = []
        for i in doc_idx:
            out.extend(_encode_with_isolation(reader, [i], tokenized, errors, workspace, embeddings))
        return out


def activation_dtype(reader: Any) -> str:
    """The storage dtype of the reader's activation values ("float16" or "float32")."""
    dtype = getattr(reader, "activation_dtype", "float16")
    if dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"activation_dtype must be one of {sorted(ACTIVATION_DTYPES)}, got {dtype!r}.")
    return dtype


def _reject_float16_overflow(part: tuple[np.ndarray, ...], errors: dict[int, str]) -> tuple[np.ndarray, ...]:
    """Reject (with the reason) documents holding a value float16 cannot store, rather than store inf."""
    doc_index, value = part[0], part[4]
    over = np.abs(value) > FLOAT16_MAX
    if not over.any():
        return part
    for doc in np.unique(doc_index[over]):
        peak = float(np.abs(value[doc_index == doc]).max())
        errors[int(doc)] = (
            f"an activation of {peak:.6g} exceeds the float16 storage range ({FLOAT16_MAX:g}); "
            "set activation_dtype='float32' for this SAE"
        )
    keep = ~np.isin(doc_index, np.unique(doc_index[over]))
    return tuple(column[keep] for column in part)


def activation_fields(dtype: str) -> list[pa.Field]:
    """The `feature` and `activation` fields with their storage type.

    Both take the writer's defaults: feature ids and float16 values (at most 65,536 bit patterns) are
    dictionary-encoded, float32 values (nearly all distinct) BYTE_STREAM_SPLIT. A dictionary keeps the
    skew of feature frequencies that BYTE_STREAM_SPLIT's byte planes hide: at width 65,536 (k 32) feature
    ids take 1.5 bytes per nonzero against 1.9 split (benchmarks/activations.py).
    """
    return [pa.field("feature", pa.int32()), pa.field("activation", ACTIVATION_DTYPES[dtype])]


def _activation_table(reader: Any, parts: list[tuple[np.ndarray, ...]], tokenized: list[Any]) -> pa.Table:
    if parts:
        doc_index, token_index, token_id, feature, activation = (
            np.concatenate(c) for c in zip(*parts, strict=True)
        )
    else:
        doc_index = token_index = feature = np.zeros(0, dtype=np.int32)
        token_id = np.zeros(0, dtype=np.int64)
        activation = np.zeros(0, dtype=np.float32)
    # Order rows by (document, token, feature) so storage compresses well and reads are predictable.
    order = _row_order(doc_index, token_index, feature)
    doc_index, token_index, token_id = doc_index[order], token_index[order], token_id[order]
    feature, activation = feature[order], activation[order]
    # Offsets are looked up through one flat array over all documents: base[doc] + token_index.
    lengths = np.array([len(t.offsets) if not isinstance(t, str) else 0 for t in tokenized], dtype=np.int64)
    base = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else np.zeros(0, dtype=np.int64)
    flat = [o for t in tokenized if not isinstance(t, str) for o in t.offsets]
    flat_offsets = np.array(flat, dtype=np.int32).reshape(-1, 2)
    where = base[doc_index] + token_index if len(doc_index) else np.zeros(0, dtype=np.int64)
    char_start = flat_offsets[where, 0] if len(doc_index) else np.zeros(0, dtype=np.int32)
    char_end = flat_offsets[where, 1] if len(doc_index) else np.zeros(0, dtype=np.int32)
    vocab = _vocab_strings(reader)
    uniq, inverse = _used_ids(token_id, len(vocab))
    token = pa.DictionaryArray.from_arrays(
        pa.array(inverse.astype(np.int32)), pa.array(vocab[uniq].tolist(), type=pa.string())
    )
    dtype = activation_dtype(reader)
    schema = pa.schema(
        [
            pa.field("doc_index", pa.int32()),
            pa.field("token_index", pa.int32()),
            pa.field("token", token.type),
            pa.field("char_start", pa.int32()),
            pa.field("char_end", pa.int32()),
            *activation_fields(dtype),
        ]
    )
    columns = [doc_index, token_index, token, char_start, char_end, feature, activation.astype(dtype)]
    pairs = zip(columns, schema, strict=True)
    arrays = [c if isinstance(c, pa.Array) else pa.array(c, f.type) for c, f in pairs]
    return pa.Table.from_arrays(arrays, schema=schema)


def _row_order(doc_index: np.ndarray, token_index: np.ndarray, feature: np.ndarray) -> np.ndarray:
    """The permutation that sorts rows by (document, token, feature), a unique key per row."""
    if not len(doc_index):
        return np.zeros(0, dtype=np.int64)
    n_tok, n_feat = int(token_index.max()) + 1, int(feature.max()) + 1
    if (int(doc_index.max()) + 1) * n_tok * n_feat >= 2**62:
        return np.lexsort((feature, token_index, doc_index))
    key = (doc_index.astype(np.int64) * n_tok + token_index) * n_feat + feature
    return np.argsort(key)  # one int64 sort: a third of lexsort's time on three keys


def _used_ids(token_id: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """`np.unique(token_id, return_inverse=True)` in one pass over a vocabulary-sized table."""
    if len(token_id) and (token_id.min() < 0 or token_id.max() >= vocab_size):
        return np.unique(token_id, return_inverse=True)
    present = np.zeros(vocab_size, dtype=bool)
    present[token_id] = True
    rank = np.cumsum(present, dtype=np.int64) - 1
    return np.flatnonzero(present), rank[token_id]


def iter_chunks(n: int, lengths: Sequence[int] | None, max_docs: int, max_chars: int) -> Iterator[range]:
    """Split `n` documents (in order) into ranges of at most `max_docs` documents / `max_chars` characters."""
    start = 0
    while start < n:
        end, chars = start, 0
        while end < n and end - start < max_docs and (end == start or chars < max_chars):
            chars += lengths[end] if lengths is not None else 0
            end += 1
        yield range(start, end)
        start = end
