"""The training loss off CUDA: the next-token log-probabilities of the trained positions only, a chunk of tokens'
logits at a time.

TRL's SFTTrainer computes its loss through a fused LM head (trl.trainer.utils.add_fused_lm_head) that never holds
every position's logits at once. On CUDA a Triton kernel folds each tile of logits in one pass over the positions
with a label. Elsewhere (the CPU) TRL falls back to torch operations that score every position, the prompt and the
packing boundaries included, and pass over each tile of logits about ten times to get the entropy and top-1 figures
it logs beside the loss. The head here scores only the positions whose next token is trained, makes each chunk's
logits once and reads them a few times (max and argmax, exponentials, their sum, the entropy's dot product), and
computes the gradient while it holds them (TRL's backward recomputes them: a third product with the output layer),
so no more than one chunk of logits is ever held. The loss, its gradient and the logged
figures are TRL's (tests/unit/test_token_loss.py).
"""

import functools
import types

import torch
from trl.trainer.utils import FusedCausalLMOutput

LOGITS_PER_CHUNK = 2**24  # fp32 logits held at once (64 MiB): 341 tokens of SmolLM2's 49,152-entry vocabulary
# Config keys of families whose logits are not plain `hidden @ head.T + bias` (Gemma 2's soft-capping, Cohere's
# scale...) or whose loss adds a router's (MoE): TRL's head, which knows them, stays on those.
_UNPLAIN_LOGITS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                   "logits_scaling", "output_router_logits")


class ChunkedNextTokenLoss(torch.autograd.Function):
    """log p(target) under softmax(hidden @ weight.T + bias) for each row of `hidden`, with each distribution's
    entropy and whether the target is its most likely token (both without gradient), `chunk` rows at a time.

    A row's gradient is its log-probability's gradient, a number, times (onehot(target) - softmax) @ weight: the
    forward computes that second factor while it holds the chunk's logits, and the backward only scales it, so the
    logits are made once (no recomputation) and never all at once. `hidden` alone gets a gradient: the output layer
    is frozen in QLoRA (never a LoRA target)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        log_probs = torch.empty(len(targets), device=hidden.device, dtype=torch.float32)
        entropy = torch.empty_like(log_probs)
        is_top1 = torch.empty(len(targets), device=hidden.device, dtype=torch.bool)
        grad_factor = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, len(targets), chunk):
            rows = slice(start, start + chunk)
            logits = _logits(hidden[rows], weight, bias)
            top, argmax = logits.max(dim=-1)
            probs = (logits - top[:, None]).exp_()
            total = probs.sum(dim=-1)
            log_z = top + total.log()
            log_probs[rows] = logits.gather(1, targets[rows, None]).squeeze(1) - log_z
            entropy[rows] = log_z - torch.linalg.vecdot(probs, logits) / total
            is_top1[rows] = argmax == targets[rows]
            if grad_factor is not None:
                probs.div_(-total[:, None])
                probs[torch.arange(len(probs), device=probs.device), targets[rows]] += 1
                grad_factor[rows] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad_factor)
        ctx.mark_non_differentiable(entropy, is_top1)
        return log_probs, entropy, is_top1

    @staticmethod
    def backward(ctx, grad_log_probs: torch.Tensor, *_) -> tuple:
        (grad_factor,) = ctx.saved_tensors
        return grad_factor * grad_log_probs[:, None].to(grad_factor.dtype), None, None, None, None


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = hidden @ weight.T if bias is None else torch.addmm(bias, hidden, weight.T)
    return logits.float()


def has_plain_logits(config) -> bool:
    """Whether the model's logits are its output layer's product alone and its loss the next-token loss alone."""
    text_config = config.get_text_config()
    return all(getattr(text_config, key, None) in (None, False) for key in _UNPLAIN_LOGITS)


def score_trained_tokens_only(model: torch.nn.Module) -> None:
    """Make `model(..., labels=labels, fused_lm_head=True)` (how SFTTrainer.compute_loss calls it, through peft and
    DDP) score with ChunkedNextTokenLoss. `model` is the causal LM that TRL gave its fused head (under the peft
    wrapper); every other call goes to TRL's forward, generation included."""
    trl_forward = model.forward
    chunk = max(1, LOGITS_PER_CHUNK // model.get_output_embeddings().weight.shape[0])

    @functools.wraps(type(model).forward)  # generate() checks its arguments against this signature
    def forward(self, *args, fused_lm_head=False, labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head or "shift_labels" in kwargs:
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        hidden = self.base_model(*args, **{**kwargs, "use_cache": False}).last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        mask = targets != -100
        head = self.get_output_embeddings()
        per_token = ChunkedNextTokenLoss.apply(hidden[mask], head.weight, head.bias, targets[mask], chunk)
        # masked_scatter keeps the loss connected to the model when no position is trained: a zero, not an error
        log_probs, entropy, is_top1 = (values.new_zeros(mask.shape).masked_scatter(mask, values)
                                       for values in per_token)
        trained = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / trained, log_probs=log_probs, entropy=entropy,
                                   is_top1=is_top1, label_mask=mask)

    model.forward = types.MethodType(forward, model)
