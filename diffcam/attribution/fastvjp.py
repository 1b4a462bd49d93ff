"""A hand-written batched backward through Llama-style decoder blocks (the per-token maps' pass).

Per-token maps need one backward vector per target through every block above the hook.  Autograd
runs them with ``is_grads_batched=True``, i.e. PyTorch's legacy ``vmap`` over the backward graph.
On small models that is slow for reasons that have nothing to do with arithmetic: the batching
rule of ``bmm`` copies the attention probabilities once per vector, ``_softmax_backward_data``
and ``silu_backward`` have no batching rule and fall back to a Python loop over the vectors, and
the per-vector intermediates (vectors x heads x sequence^2) are reshaped several times.

This module computes the same vector-Jacobian products by hand for LLaMA-style decoder blocks
(RMSNorm -> attention with rotary positions and grouped KV heads -> residual -> RMSNorm ->
SwiGLU MLP -> residual, with the attribute names of transformers' Llama / Qwen2 / Mistral
layers; subclasses that only change what the block returns, as several dMLLM families' do,
qualify), with the K vectors as a leading batch dimension of ordinary tensors:

* each block above the hook is re-run once from its captured input (``block_forward``), which
  keeps what the backward needs and is **checked against the block's real output** from the
  attribution forward -- any difference (an unsupported variant: other norms, sliding windows,
  soft-capping, another rotary layout, another mask semantics) makes the caller fall back to
  autograd, so a model this code does not understand still gets autograd's gradients.  With
  ``BlockCapture(trusted=...)`` the check is made once per kind of call (argument kinds and the
  block's structure); later calls of a checked kind run ``block_forward`` in place of the
  block's forward, so the blocks above the hook run once per pass instead of twice;
* ``block_vjp`` pushes the (K, B, L, D) gradient through the block: matrix products with the
  K vectors folded into rows or columns, the softmax backward written out
  (dS = P * (dP - rowsum(dP * P))), and the rotary backward as the transposed rotation;
* the vectors start at the scored rows: a gradient that is zero outside a few rows (the top
  block's) is pushed through the row-wise parts and the attention queries of those rows only
  (``rows``); keys and values still get gradients at every position.

Everything runs in float32 (weights of a half-precision model are upcast per product).  Tests
(tests/attribution/test_fastvjp.py) compare every block and the whole pass against autograd on
random inputs, masks, grouped KV heads and sparse-row gradients.

>>> import torch
>>> from transformers import LlamaConfig
>>> from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
>>> cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=4,
...                   num_key_value_heads=2, attn_implementation="eager")
>>> _ = torch.manual_seed(0)
>>> layer = LlamaDecoderLayer(cfg, layer_idx=0).eval()
>>> x = torch.randn(1, 6, 16, requires_grad=True)
>>> cos, sin = LlamaRotaryEmbedding(cfg)(x, torch.arange(6)[None])
>>> y = layer(x, attention_mask=None, position_embeddings=(cos, sin))
>>> G = torch.randn(3, 1, 6, 16)                          # three backward vectors at once
>>> ref = torch.autograd.grad(y, x, G, is_grads_batched=True)[0]
>>> out, saved = block_forward(layer, x.detach(), None, cos, sin)
>>> bool(torch.allclose(out, y.detach(), atol=1e-6))
True
>>> bool(torch.allclose(block_vjp(layer, saved, G), ref, atol=1e-5))
True
"""

from __future__ import annotations

from typing import List, Optional

import torch

__all__ = ["unsupported_reason", "block_forward", "block_vjp", "BlockCapture",
           "FastMismatch"]

_ACTS = ("SiLUActivation", "SiLU")


class FastMismatch(RuntimeError):
    """The hand-written pass cannot stand in for autograd on this model (the caller falls back)."""


def unsupported_reason(block) -> Optional[str]:
    """None when ``block`` has the structure :func:`block_forward` reproduces (a LLaMA-style
    decoder layer: RMSNorm, q/k/v/o projections with rotary positions, RMSNorm, SwiGLU MLP,
    attribute names as in transformers), else why not.  The structure is necessary, not
    sufficient: :func:`prepare` checks the numbers."""
    name = type(block).__name__
    if not isinstance(block, torch.nn.Module):
        return f"{name} is not a torch module"
    if getattr(block, "training", False):
        return "the block is in training mode"
    for n in ("input_layernorm", "post_attention_layernorm"):
        norm = getattr(block, n, None)
        if (not type(norm).__name__.endswith("RMSNorm") or not hasattr(norm, "variance_epsilon")
                or not isinstance(getattr(norm, "weight", None), torch.Tensor)):
            return f"{name}.{n} is {type(norm).__name__}, not an RMSNorm with variance_epsilon"
    at, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    if at is None or mlp is None:
        return "no self_attn / mlp"
    for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if not isinstance(getattr(at, n, None), torch.nn.Linear):
            return f"self_attn.{n} is not a Linear"
    for n in ("q_norm", "k_norm"):
        if getattr(at, n, None) is not None:
            return f"self_attn.{n} (query/key norms) is not handled"
    if getattr(at, "sliding_window", None) is not None:
        return "sliding-window attention is not handled"
    if not hasattr(at, "head_dim") or not hasattr(at, "scaling"):
        return "self_attn has no head_dim / scaling"
    for n in ("gate_proj", "up_proj", "down_proj"):
        if not isinstance(getattr(mlp, n, None), torch.nn.Linear):
            return f"mlp.{n} is not a Linear"
    if type(getattr(mlp, "act_fn", None)).__name__ not in _ACTS:
        return f"mlp.act_fn is {type(getattr(mlp, 'act_fn', None)).__name__}, not SiLU"
    return None


def _w(lin, dtype):
    return lin.weight if lin.weight.dtype == dtype else lin.weight.to(dtype)


def _rms(x, norm):
    x32 = x.float()
    r = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * (x32 * r).to(x.dtype), r


def _rms_bwd(dy, xr, weight, r):
    """Backward of y = weight * x * r, r = rsqrt(mean(x^2) + eps), given xr = x * r:
    dy (K, ..., D) -> dx = r * (g - xr * mean(g * xr)), g = dy * weight."""
    g = dy * weight.float()
    t = (g * xr).mean(-1, keepdim=True)
    return g.addcmul_(xr, t, value=-1.0).mul_(r)


def _rot(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), -1)


def _signed_sin(s):
    """sin' with R^T (u * sin) = roll(u, hd/2) * sin' for the rotate_half R: R^T v = (v2, -v1),
    so R^T (u * s) = (u2 s2, -u1 s1) = (u2, u1) * (s2, -s1)."""
    h = s.shape[-1] // 2
    return torch.cat((s[..., h:], -s[..., :h]), -1)


def _rope_bwd(d, c, s2):
    """Backward of q' = q * cos + rotate_half(q) * sin: dq = dq' * cos + R^T (dq' * sin)."""
    return torch.addcmul(d * c, torch.roll(d, d.shape[-1] // 2, -1), s2)


def _mask_add(scores, mask):
    if mask is None:
        return scores
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return scores + mask[..., :scores.shape[-1]].to(scores.dtype)


def block_forward(block, x, mask, cos, sin, is_causal=None, keep_rows=None):
    """Re-run ``block`` on ``x`` (B, L, D) with its additive / boolean ``mask`` and rotary
    ``cos``/``sin`` (B, L, head_dim) as the eager implementation does; returns the output and
    what :func:`block_vjp` needs.  Without a mask, a block on the ``sdpa`` implementation is
    causal as torch's SDPA makes it (``is_causal`` from the call, else the attention module's
    flag); any other implementation attends everywhere.

    ``keep_rows`` (1-D LongTensor): keep the row-wise tensors (queries, attention rows, MLP)
    of these positions only -- enough for a gradient that lives on those rows (the top
    block's), and an H x L x L attention matrix less to hold; :func:`block_vjp` then works on
    exactly these rows."""
    at, mlp = block.self_attn, block.mlp
    B, L, _ = x.shape
    if mask is None and L > 1 and getattr(getattr(at, "config", None), "_attn_implementation",
                                          None) == "sdpa":
        causal = is_causal if is_causal is not None else getattr(at, "is_causal", True)
        if causal:
            mask = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    hd = at.head_dim
    n1, r1 = _rms(x, block.input_layernorm)
    q = at.q_proj(n1).view(B, L, -1, hd).transpose(1, 2)
    k = at.k_proj(n1).view(B, L, -1, hd).transpose(1, 2)
    v = at.v_proj(n1).view(B, L, -1, hd).transpose(1, 2)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    q = q * c + _rot(q) * s
    k = k * c + _rot(k) * s
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k = k.repeat_interleave(rep, 1)
        v = v.repeat_interleave(rep, 1)
    sc = _mask_add(torch.matmul(q, k.transpose(-1, -2)) * at.scaling, mask)
    p = torch.softmax(sc, -1, dtype=torch.float32).to(q.dtype)
    o = torch.matmul(p, v).transpose(1, 2).reshape(B, L, -1)
    h1 = x + at.o_proj(o)
    n2, r2 = _rms(h1, block.post_attention_layernorm)
    g = mlp.gate_proj(n2)
    u = mlp.up_proj(n2)
    g32 = g.float()
    sg = torch.sigmoid(g32)
    a = g32 * sg                                   # silu(g)
    y = h1 + mlp.down_proj(a.to(g.dtype) * u)
    # what the backward needs, no more: the MLP's two local derivatives (d/dg of a*u is
    # u * silu'(g), d/du is a) instead of g, u and the sigmoid
    gd = sg.mul_(1 + g32 * (1 - sg)).mul_(u.float())
    saved = dict(xr1=x.float() * r1, r1=r1, q=q.float(), k=k.float(), v=v.float(),
                 p=p.float(), c=c.float(), s2=_signed_sin(s.float()), rep=rep,
                 xr2=h1.float() * r2, r2=r2, gd=gd, a=a, rows=None)
    if keep_rows is not None:
        for n, dim in _ROW_DIMS.items():
            saved[n] = saved[n].index_select(dim, keep_rows)
        saved["rows"] = keep_rows
    return y, saved


#: the saved tensors block_vjp reads on the gradient's rows only, and their row dimension
_ROW_DIMS = {"q": 2, "p": 2, "xr2": 1, "r2": 1, "gd": 1, "a": 1}


def block_vjp(block, saved, G, rows=None):
    """Gradient w.r.t. the block's input of K vectors ``G`` (K, B, L, D) given at its output.

    ``rows``: a 1-D LongTensor of the sequence positions where ``G`` can be non-zero (None:
    anywhere); the row-wise parts and the attention queries then run on those rows only.
    When ``saved`` was made with ``keep_rows``, those rows are used (``rows`` must be None or
    the same), and ``G`` must vanish outside them."""
    at, mlp = block.self_attn, block.mlp
    f = torch.float32
    G = G.to(f)
    K, B, L, D = G.shape
    hd = at.head_dim
    sv = saved
    pre = sv.get("rows")
    if pre is not None:
        if rows is not None and not torch.equal(rows, pre):
            raise ValueError("rows differ from the rows the saved tensors were kept for")
        rows = pre
    sel = (lambda t, dim: t) if rows is None else (lambda t, dim: t.index_select(dim, rows))
    # the row-wise saved tensors: already on the rows when kept so
    sel_s = sel if pre is None else (lambda t, dim: t)
    R = L if rows is None else int(rows.numel())
    GR = sel(G, 2)                                                 # (K, B, R, D)
    # MLP: y = h1 + down(a * u), a = silu(g)
    dm = GR @ _w(mlp.down_proj, f)                                 # (K, B, R, I)
    dg = dm * sel_s(sv["gd"], 1)
    du = dm.mul_(sel_s(sv["a"], 1))
    dn2 = dg @ _w(mlp.gate_proj, f)
    dn2 += du @ _w(mlp.up_proj, f)
    dh1 = GR + _rms_bwd(dn2, sel_s(sv["xr2"], 1), block.post_attention_layernorm.weight,
                        sel_s(sv["r2"], 1))                        # (K, B, R, D)
    # attention: h1 = x + o_proj(o)
    do = (dh1 @ _w(at.o_proj, f)).view(K, B, R, -1, hd)            # (K, B, R, H, hd)
    H = do.shape[3]
    q, k, v, p = sv["q"], sv["k"], sv["v"], sv["p"]
    qR, pR = sel_s(q, 2), sel_s(p, 2)                              # (B, H, R, hd), (B, H, R, L)
    do = do.permute(1, 3, 0, 2, 4)                                 # (B, H, K, R, hd)
    # dV = P_R^T dO (the K vectors folded into the columns)
    dv = torch.matmul(pR.transpose(-1, -2), do.permute(0, 1, 3, 2, 4).reshape(B, H, R, K * hd))
    dv = dv.view(B, H, L, K, hd)
    # dS = P * (dP - rowsum(dP * P)), dP = dO V^T (the K vectors folded into the rows).  The
    # products are laid out so that BLAS never sees a head-size-wide output (slow for small
    # heads): dQ and dK are computed transposed, (hd x K*R) and (hd x L) per head.
    # (contiguous operands: a permuted view with a batch stride smaller than its matrix can
    # send BLAS down a path several times slower)
    vt = v.transpose(-1, -2).contiguous().view(B * H, hd, L)
    dS = torch.bmm(do.contiguous().view(B * H, K * R, hd), vt).view(B, H, K, R, L)
    pe = pR.unsqueeze(2)
    dS.mul_(pe)
    rs = dS.sum(-1, keepdim=True)
    dS.addcmul_(pe, rs, value=-1.0)
    dq = torch.matmul(k.transpose(-1, -2), dS.view(B, H, K * R, L).transpose(-1, -2))
    dq = dq.view(B, H, hd, K, R).permute(0, 1, 3, 4, 2).mul(at.scaling)       # (B,H,K,R,hd)
    dk = torch.matmul(qR.transpose(-1, -2).unsqueeze(2), dS)                   # (B,H,K,hd,L)
    del dS
    rep = sv["rep"]
    if rep > 1:     # grouped KV heads: add up each group's heads (contiguous outer sums)
        dk = dk.view(B, H // rep, rep, K, hd, L).sum(2)
        dv = dv.view(B, H // rep, rep, L, K, hd).sum(2)
    dk = dk.transpose(-1, -2).mul(at.scaling)                                  # (B,Hk,K,L,hd)
    c, s2 = sv["c"].unsqueeze(2), sv["s2"].unsqueeze(2)            # (B, 1, 1, L, hd)
    dq = _rope_bwd(dq, sel(c, 3), sel(s2, 3))
    dk = _rope_bwd(dk, c, s2)
    dq = dq.permute(2, 0, 3, 1, 4).reshape(K, B, R, -1)
    dk = dk.permute(2, 0, 3, 1, 4).reshape(K, B, L, -1)
    dv = dv.permute(3, 0, 2, 1, 4).reshape(K, B, L, -1)
    dn1 = dk @ _w(at.k_proj, f)
    dn1 += dv @ _w(at.v_proj, f)
    dqn = dq @ _w(at.q_proj, f)
    if rows is None:
        dn1 += dqn
        out = dh1
    else:
        dn1.index_add_(2, rows, dqn)
        out = torch.zeros(K, B, L, D, dtype=f, device=G.device).index_copy_(2, rows, dh1)
    out += _rms_bwd(dn1, sv["xr1"], block.input_layernorm.weight, sv["r1"])
    return out


def _kind(v):
    """A hashable description of one argument of a block call, or None when the argument is of a
    kind the substitution does not vouch for (anything but tensors, tuples of tensors and plain
    scalars: a KV cache object, say, which the real block would write into)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return ("v", v)
    if torch.is_tensor(v):
        return ("t", v.dtype, v.dim(), v.device.type, v.requires_grad)
    if isinstance(v, (tuple, list)) and all(torch.is_tensor(t) for t in v):
        return ("s", tuple(_kind(t) for t in v))
    return None


def _structure(block, fwd):
    """What a check of ``block`` vouches for besides the arguments: the identity of the forward
    function and of every submodule block_forward calls, the attention implementation, the
    attention's causal flag, the weights' dtype and the training flags (a swapped projection or
    norm, another forward, a causal switch, dropout switched on: checked again)."""
    at, mlp = block.self_attn, block.mlp
    mods = (at, at.q_proj, at.k_proj, at.v_proj, at.o_proj, mlp, mlp.gate_proj, mlp.up_proj,
            mlp.down_proj, mlp.act_fn, block.input_layernorm, block.post_attention_layernorm)
    impl = getattr(getattr(at, "config", None), "_attn_implementation", None)
    # the objects themselves (hashed by identity), not their id(): a replaced module that was
    # freed could hand its id to a new one
    return (getattr(fwd, "__func__", fwd), mods, impl, getattr(at, "is_causal", None),
            at.q_proj.weight.dtype, tuple(bool(m.training) for m in (block,) + mods))


class BlockCapture:
    """Context manager: record the input, mask, rotary tables and output of each block in
    ``blocks`` (consecutive blocks, run in order) during one forward (forward pre-hooks with
    keyword arguments, forward hooks).

    The blocks run without autograd (gradient mode off from the first block's start to the last
    block's end): the hand-written backward does not need their graph.  The last block's output
    is handed on as a new leaf that requires grad (``records[-1]["y"]``), so the scores above
    it still have a graph down to it.

    ``trusted`` (one dict per block, kept by the caller across calls; None: never): the kinds
    of call (:func:`_kind` of every argument, :func:`_structure` of the block) for which
    :func:`prepare` has already checked :func:`block_forward` against the block's real
    forward, each with the form of the block's return value.  Inside the context a call of a
    trusted kind runs :func:`block_forward` *instead of* the block's forward (the hooks still
    fire), keeping what the backward needs (``records[i]["saved"]``; the last block with
    ``top_rows`` only), so the blocks above the hook run once per attribution pass instead of
    twice.  Any other call runs the real block, and :func:`prepare` checks it and, when it
    matches, trusts its kind from then on."""

    def __init__(self, blocks, trusted=None, top_rows=None):
        self.blocks = list(blocks)
        self.records: List[dict] = [dict() for _ in self.blocks]
        self._handles = []
        self._grad = None
        if trusted is not None and len(trusted) != len(self.blocks):
            raise ValueError("trusted needs one dict per block")
        self.trusted = trusted
        self.top_rows = top_rows
        self._patched = []

    def _pre(self, i):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states")
            pe = kwargs.get("position_embeddings")
            self.records[i].update(x=x, mask=kwargs.get("attention_mask"), pe=pe,
                                   is_causal=kwargs.get("is_causal"),
                                   calls=self.records[i].get("calls", 0) + 1)
            if i == 0:
                self._grad = torch.is_grad_enabled()
                torch.set_grad_enabled(False)
        return hook

    def _post(self, i):
        def hook(module, args, kwargs, out):
            y = out[0] if isinstance(out, tuple) else out
            if torch.is_tensor(out):
                self.records[i]["form"] = 0
            elif isinstance(out, tuple) and out and all(o is None for o in out[1:]):
                self.records[i]["form"] = len(out)
            if i == len(self.blocks) - 1 and self._grad is not None:
                torch.set_grad_enabled(self._grad)
                self._grad = None
                if torch.is_tensor(y):
                    y = y.detach().requires_grad_(True)
                    out = (y,) + tuple(out[1:]) if isinstance(out, tuple) else y
            self.records[i]["y"] = y
            return out
        return hook

    def _substitute(self, i, block, real):
        last = i == len(self.blocks) - 1

        def forward(*args, **kwargs):
            rec = self.records[i]
            sig = None
            if len(args) == 1 and torch.is_tensor(args[0]):
                kinds = tuple(sorted((k, _kind(v)) for k, v in kwargs.items()))
                if all(kd is not None for _, kd in kinds):
                    sig = (_kind(args[0]), kinds, _structure(block, real))
            rec["sig"] = sig
            form = self.trusted[i].get(sig) if sig is not None else None
            pe = kwargs.get("position_embeddings")
            if form is None or not (isinstance(pe, (tuple, list)) and len(pe) == 2):
                return real(*args, **kwargs)
            y, saved = block_forward(block, args[0], kwargs.get("attention_mask"), pe[0], pe[1],
                                     kwargs.get("is_causal"), self.top_rows if last else None)
            rec["saved"] = saved
            return y if form == 0 else (y,) + (None,) * (form - 1)
        return forward

    def __enter__(self):
        for i, b in enumerate(self.blocks):
            self._handles.append(b.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self._handles.append(b.register_forward_hook(self._post(i), with_kwargs=True))
        if self.trusted is not None:
            for i, b in enumerate(self.blocks):
                had = "forward" in b.__dict__
                self._patched.append((b, had, b.__dict__.get("forward")))
                b.forward = self._substitute(i, b, b.forward)
        return self

    def __exit__(self, *exc):
        self.remove()

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for b, had, old in reversed(self._patched):
            if had:
                b.forward = old
            else:
                del b.forward
        self._patched.clear()
        if self._grad is not None:          # a forward that raised between the two hooks
            torch.set_grad_enabled(self._grad)
            self._grad = None

    def check(self):
        """Raise :class:`FastMismatch` unless every block ran once with what block_forward
        needs (a tensor input, rotary tables passed as ``position_embeddings``)."""
        for i, r in enumerate(self.records):
            if r.get("calls") != 1 or not torch.is_tensor(r.get("x")) or "y" not in r:
                raise FastMismatch(f"block {i} above the hook did not run exactly once")
            pe = r.get("pe")
            if not (isinstance(pe, (tuple, list)) and len(pe) == 2 and torch.is_tensor(pe[0])):
                raise FastMismatch("the blocks do not receive position_embeddings=(cos, sin)")

    def clear(self):
        self.records = [dict() for _ in self.blocks]


def prepare(cap: BlockCapture, tol: Optional[float] = None, top_rows=None) -> list:
    """Re-run every captured block (:func:`block_forward`, no graph) and check its output against
    the real one; returns the per-block saved tensors.  Raises :class:`FastMismatch` on any
    difference above ``tol`` x the output's scale (default 1e-4 for float32, 2e-2 otherwise).
    ``top_rows``: the rows where the gradients at the last block's output can be non-zero (the
    scored positions); the last block then keeps its row-wise tensors for those rows only.

    A block that ran :func:`block_forward` in place of its forward (a trusted kind of call, see
    :class:`BlockCapture`) is not re-run: its saved tensors are taken as they are (the last
    block's must have been kept for ``top_rows``, or for every row).  A block checked here
    makes its kind of call trusted in ``cap.trusted``."""
    cap.check()
    out = []
    with torch.no_grad():
        for i, (blk, r) in enumerate(zip(cap.blocks, cap.records)):
            last = i == len(cap.blocks) - 1
            if "saved" in r:
                saved = r["saved"]
                kept = saved.get("rows")
                if last and kept is not None and (top_rows is None
                                                  or not torch.equal(kept, top_rows)):
                    raise FastMismatch("the last block kept other rows than the scored ones")
                out.append(saved)
                continue
            x = r["x"].detach()
            cos, sin = r["pe"]
            try:
                y, saved = block_forward(blk, x, r["mask"], cos.detach(), sin.detach(),
                                         r.get("is_causal"), top_rows if last else None)
            except Exception as e:     # e.g. multimodal rotary tables of another shape
                raise FastMismatch(f"block {i} above the hook could not be re-run: "
                                   f"{type(e).__name__}: {e}") from None
            ref = r["y"].detach()
            t = tol if tol is not None else (1e-4 if ref.dtype == torch.float32 else 2e-2)
            scale = float(ref.float().abs().max()) if ref.numel() else 0.0
            err = float((y.float() - ref.float()).abs().max()) if ref.numel() else 0.0
            if not err <= t * max(scale, 1.0):
                raise FastMismatch(f"block {i} above the hook: the re-run differs from the real "
                                   f"output by {err:.3g} (scale {scale:.3g})")
            if cap.trusted is not None and r.get("sig") is not None and "form" in r:
                cap.trusted[i][r["sig"]] = r["form"]
            out.append(saved)
    return out


def backward(cap: BlockCapture, saved: list, G: torch.Tensor) -> torch.Tensor:
    """Push ``G`` (K, B, L, D), the gradient at the output of the last captured block, down to
    the input of the first one."""
    with torch.no_grad():
        G = G.float()
        for j, (blk, sv) in enumerate(zip(reversed(cap.blocks), reversed(saved))):
            rows = None      # below the top block attention has spread G over every row
            if j == 0 and sv.get("rows") is None:       # top block not prepared for its rows
                live = G.abs().amax(dim=(0, 1, 3)) > 0
                if int(live.sum()) <= G.shape[2] // 2:
                    rows = torch.nonzero(live).flatten()
            G = block_vjp(blk, sv, G, rows)
    return G
