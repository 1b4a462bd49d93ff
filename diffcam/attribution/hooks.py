"""The hook trick of method.md 1.3: make the autograd graph start at one transformer block.

:class:`BlockHook` registers a forward hook on a block that replaces the block's output (a tensor,
or a tuple whose element 0 is the hidden state) by ``out.detach().requires_grad_(True)``.  The
layers below the block are then not part of the graph (nothing of them is saved for backward),
and the stored tensor is the leaf to differentiate against.  The hook is always removed on exit,
also when the body raises.

>>> import torch
>>> block = torch.nn.Linear(4, 4)
>>> with BlockHook(block) as hook:
...     y = block(torch.randn(2, 4)).sum()
>>> hook.output.requires_grad, hook.output.grad_fn is None, len(block._forward_hooks)
(True, True, 0)
"""

from __future__ import annotations

__all__ = ["BlockHook", "HookNotTriggeredError"]


class HookNotTriggeredError(RuntimeError):
    """The hooked block never ran during the forward."""


class BlockHook:
    """Context manager: hook ``block``'s output and start the autograd graph there.

    ``output`` is the hooked hidden state (B, L, D), a leaf that requires grad.  ``calls`` counts
    how many times the block ran; a block that runs twice (activation checkpointing re-runs
    blocks) raises, because the second call would replace the leaf.

    ``positions`` (optional 1-D LongTensor of sequence positions, e.g. the image tokens): then
    only those positions form the leaf (``leaf``, (B, n, D)), spliced back into the detached
    output with ``index_copy``, so gradients are only materialised where they are needed.
    ``output`` is then the full detached hidden state (its values).
    """

    def __init__(self, block, name: str = "block", positions=None):
        self.block = block
        self.name = name
        self.positions = positions
        self._handle = None
        self._output = None
        self._leaf = None
        self.calls = 0

    def _start(self, h):
        if self.positions is None:
            h = h.detach().requires_grad_(True)
            self._output = self._leaf = h
            return h
        hd = h.detach()
        if self.positions.numel() and int(self.positions.max()) >= hd.shape[1]:
            raise ValueError(
                f"{self.name} saw {hd.shape[1]} positions but the image tokens reach position "
                f"{int(self.positions.max())}: the hooked hidden sequence does not contain the "
                "whole image span (feasibility rule, method.md 1.8)")
        leaf = hd[:, self.positions].requires_grad_(True)
        self._output, self._leaf = hd, leaf
        return hd.index_copy(1, self.positions, leaf)

    def _hook(self, module, inputs, out):
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError(
                f"{self.name} ran {self.calls} times in one forward; disable activation "
                "checkpointing (or any re-run of the block) before explaining")
        if isinstance(out, tuple):
            if not out or not hasattr(out[0], "detach"):
                raise TypeError(f"{self.name} returned a tuple whose element 0 is not a tensor")
            return (self._start(out[0]),) + tuple(out[1:])
        if hasattr(out, "detach"):
            return self._start(out)
        raise TypeError(f"{self.name} returned {type(out).__name__}; expected a tensor or a tuple "
                        "whose element 0 is the hidden state")

    def __enter__(self) -> "BlockHook":
        self.calls = 0
        self._output = self._leaf = None
        self._handle = self.block.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @property
    def output(self):
        """The hooked hidden state; raises :class:`HookNotTriggeredError` if the block never ran."""
        if self._output is None:
            raise HookNotTriggeredError(
                f"{self.name} never ran during the forward: the adapter's forward does not go "
                "through adapter.blocks()[layer] (wrong block list, or a cached path)")
        return self._output

    @property
    def leaf(self):
        """The tensor the gradients are taken against (``output`` unless ``positions``)."""
        self.output
        return self._leaf

    def clear(self) -> None:
        self._output = None
        self._leaf = None
