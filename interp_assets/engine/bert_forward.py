"""A fused forward pass for BERT-family readers (the embedded all-MiniLM-L6-v2 is one).

The same math as transformers' `BertModel` up to the hooked layer, arranged for throughput:
- token-major on real tokens only: every projection and MLP runs on the batch's real tokens, never on
  padding (only attention sees the padded [batch, length] layout);
- Q, K and V in one matmul; the MLP's intermediate and the packed Q/K/V in reused workspace buffers, its
  activation applied in place (a fresh multi-MB tensor per op costs a zeroed page per 4 KiB);
- the last layer computed runs its output projection and MLP only for the tokens the SAE reads (special
  and template tokens are attended to, but their hidden states at the hook are never needed);
- short batches use a plain batched-matmul attention (CPU flash attention costs more than it saves below
  `_SHORT_ATTENTION` tokens); longer ones use `scaled_dot_product_attention`.
Results equal the hooked hidden states of the Hugging Face forward to float rounding (tests compare them).
Any other architecture, or a BERT variant this does not cover, keeps the generic hooked forward.
"""

from __future__ import annotations

from typing import Any

from interp_assets.engine.allocator import Workspace
from interp_assets.engine.reader import find_layer_module

_ACTIVATIONS = ("gelu", "relu")  # in-place exact versions: aten.gelu_ (erf form), relu_
_SHORT_ATTENTION = 32  # on CPU, padded lengths up to this use batched-matmul attention


def supports_bert_forward(model: Any) -> bool:
    """True when `model` is a plain BERT encoder this fused forward reproduces exactly."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) != "bert" or type(model).__name__ != "BertModel":
        return False
    if model.training or getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        return False  # training mode: the Hugging Face forward applies dropout
    if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        return False
    if cfg.hidden_act not in _ACTIVATIONS or cfg.hidden_size % cfg.num_attention_heads:
        return False
    return hasattr(model, "embeddings") and hasattr(model, "encoder")


class BertForward:
    """The hidden states a BERT model feeds into (`pre`) or gets out of (`post`) block `layer`."""

    def __init__(self, model: Any, layer: int, position: str, through_last: bool = False) -> None:
        """`through_last`: also keep the blocks after the hooked one, for `with_document_embeddings`."""
        if not supports_bert_forward(model):
            raise ValueError(f"{type(model).__name__} is not a plain BertModel; use the hooked forward.")
        find_layer_module(model, layer)  # the hooked forward's check: a clear error for a missing layer
        n_blocks = layer + (1 if position == "post" else 0)
        self.embeddings = model.embeddings
        self.heads = int(model.config.num_attention_heads)
        self.activation = model.config.hidden_act
        self.blocks = [_block_weights(block) for block in model.encoder.layer[:n_blocks]]
        after = model.encoder.layer[n_blocks:]
        self.tail = [_block_weights(block) for block in after] if through_last else None

    def __call__(self, input_ids: Any, attention_mask: Any, keep: Any, workspace: Workspace) -> Any:
        """Hidden states [n_kept, d] of the tokens where `keep` [batch, length] is True, in row-major order.

        `attention_mask` marks real tokens (right padding); `keep` must be a subset of them.
        """
        import torch

        with torch.inference_mode():
            return self._forward(input_ids, attention_mask.bool(), keep.bool(), workspace, pool=False)[0]

    def with_document_embeddings(
        self, input_ids: Any, attention_mask: Any, keep: Any, workspace: Workspace
    ) -> tuple[Any, Any, Any]:
        """`(hidden, at_hook, last)`: the hidden states `__call__` gives, computed exactly as it does, and
        from the same pass each document's hidden states averaged over its real tokens ([batch, d], not
        normalized: the document embedding recipe, `mean_over_documents`) at the hook and, carried on
        through the last block, at the last layer: for the cost of the blocks after the hooked one. Needs
        `through_last=True`."""
        import torch

        if self.tail is None:
            raise ValueError("This BertForward was built without through_last=True; it stops at the hook.")
        with torch.inference_mode():
            return self._forward(input_ids, attention_mask.bool(), keep.bool(), workspace, pool=True)

    def _forward(self, ids: Any, real: Any, keep: Any, ws: Workspace, pool: bool) -> tuple[Any, ...]:
        import torch

        batch, length = ids.shape
        emb = self.embeddings
        x = emb.word_embeddings(ids) + emb.token_type_embeddings.weight[0]
        x = emb.LayerNorm(x + emb.position_embeddings.weight[:length])
        real_flat = real.reshape(-1)
        token_rows = real_flat.nonzero().squeeze(1)  # real tokens' rows in the flat [batch * length] layout
        pad_rows = (~real_flat).nonzero().squeeze(1)
        hidden = x.reshape(batch * length, -1).index_select(0, token_rows)
        kept = keep.reshape(-1).index_select(0, token_rows)
        key_bias = torch.zeros(batch, 1, length, dtype=x.dtype, device=x.device)
        key_bias.masked_fill_(~real[:, None, :], float("-inf"))
        for block in self.blocks[:-1]:
            hidden = self._block(block, hidden, token_rows, pad_rows, key_bias, ws)
        if not self.blocks:
            full, hooked = hidden, hidden[kept]
        else:  # the hooked block: the rest runs for the tokens the SAE reads only
            context = self._attend(self.blocks[-1], hidden, token_rows, pad_rows, key_bias, ws)
            hooked = self._feed_forward(self.blocks[-1], context[kept], hidden[kept], ws)
            full = None
            if pool:  # the other real tokens (special ones) too, in matmuls of their own: `hooked` is as ever
                full = torch.empty_like(hidden)
                full[kept] = hooked
                full[~kept] = self._feed_forward(self.blocks[-1], context[~kept], hidden[~kept], ws)
        if not pool:
            return (hooked,)
        at_hook = mean_over_documents(full, real)
        for block in self.tail:
            full = self._block(block, full, token_rows, pad_rows, key_bias, ws)
        return hooked, at_hook, mean_over_documents(full, real)

    def _block(
        self, p: dict, hidden: Any, token_rows: Any, pad_rows: Any, key_bias: Any, ws: Workspace
    ) -> Any:
        """One block on every real token."""
        context = self._attend(p, hidden, token_rows, pad_rows, key_bias, ws)
        return self._feed_forward(p, context, hidden, ws)

    def _attend(
        self, p: dict, hidden: Any, token_rows: Any, pad_rows: Any, key_bias: Any, ws: Workspace
    ) -> Any:
        """The attention context [n_real, d] of a block's input `hidden` (before its output projection)."""
        import torch
        import torch.nn.functional as F

        n, d = hidden.shape
        batch, _, length = key_bias.shape
        heads, head_dim = self.heads, d // self.heads
        qkv = torch.addmm(p["b_qkv"], hidden, p["w_qkv"], out=ws.get("qkv", n, 3 * d, hidden))
        padded = ws.get("qkv_padded", batch * length, 3 * d, hidden)
        padded.index_copy_(0, token_rows, qkv)
        padded.index_fill_(0, pad_rows, 0.0)
        q, k, v = padded.view(batch, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        if length <= _SHORT_ATTENTION and hidden.device.type == "cpu":
            bh = batch * heads
            bias = key_bias.unsqueeze(1).expand(batch, heads, 1, length).reshape(bh, 1, length)
            scores = torch.baddbmm(
                bias,
                q.reshape(bh, length, head_dim),
                k.reshape(bh, length, head_dim).transpose(1, 2),
                alpha=head_dim**-0.5,
            )
            context = torch.bmm(scores.softmax(-1), v.reshape(bh, length, head_dim))
            context = context.view(batch, heads, length, head_dim)
        else:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias.unsqueeze(1))
        return context.transpose(1, 2).reshape(batch * length, d).index_select(0, token_rows)

    def _feed_forward(self, p: dict, context: Any, hidden: Any, ws: Workspace) -> Any:
        """The rest of a block for some tokens: output projection, residual, norm, MLP, residual, norm."""
        import torch

        n = hidden.shape[0]
        attended = p["norm_attn"](torch.addmm(p["b_o"], context, p["w_o"]).add_(hidden))
        inner = torch.addmm(p["b_in"], attended, p["w_in"], out=ws.get("mlp", n, p["w_in"].shape[1], hidden))
        if self.activation == "gelu":
            torch.ops.aten.gelu_(inner)
        else:
            inner.relu_()
        return p["norm_out"](torch.addmm(p["b_out"], inner, p["w_out"]).add_(attended))


def mean_over_documents(tokens: Any, real: Any) -> Any:
    """Each document's mean of `tokens` [n_real, d] (the real tokens of a right-padded batch in row-major
    order, as `BertForward` gives them) over its real tokens (`real` [batch, length]): [batch, d]."""
    import torch

    lengths = real.sum(1)
    rows = torch.repeat_interleave(torch.arange(real.shape[0], device=tokens.device), lengths)
    summed = tokens.new_zeros(real.shape[0], tokens.shape[1]).index_add_(0, rows, tokens)
    return summed / lengths.clamp(min=1).unsqueeze(1).to(summed.dtype)


def _block_weights(block: Any) -> dict:
    """A BertLayer's weights as the fused forward uses them."""
    import torch

    attn = block.attention
    with torch.no_grad():
        return {
            # [d, 3d]: one matmul gives Q | K | V
            "w_qkv": torch.cat([attn.self.query.weight, attn.self.key.weight, attn.self.value.weight]).t(),
            "b_qkv": torch.cat([attn.self.query.bias, attn.self.key.bias, attn.self.value.bias]),
            "w_o": attn.output.dense.weight.t(),
            "b_o": attn.output.dense.bias,
            "norm_attn": attn.output.LayerNorm,
            "w_in": block.intermediate.dense.weight.t(),
            "b_in": block.intermediate.dense.bias,
            "w_out": block.output.dense.weight.t(),
            "b_out": block.output.dense.bias,
            "norm_out": block.output.LayerNorm,
        }
