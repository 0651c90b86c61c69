"""Fidelity: how closely one model computes what another does, on held-out conversations (KL, top-1, greedy).

The merge compares its merged model with the QLoRA model it came from; the export compares each GGUF file with
the merged model. Both use the first held-out conversations of the eval split, and the same figures.
"""

from pathlib import Path

import torch

from tuneline.modeling import end_token_ids, pad_batch, read_split


def held_out_sequences(dataset_dir: Path, count: int) -> list[list[int]]:
    """The first `count` whole conversations of the eval split (token ids)."""
    return [list(ids) for ids in read_split(dataset_dir / "eval.parquet")["input_ids"][:count]]


def held_out_prompts(dataset_dir: Path, count: int) -> list[list[int]]:
    """The same conversations up to their answer: what the evaluate stage has the models answer."""
    rows = read_split(dataset_dir / "eval.parquet").head(count)
    return [list(row.input_ids[: row.prompt_length]) for row in rows.itertuples()]


def held_out_batches(tokenizer, sequences: list[list[int]], batch_size: int = 8) -> list:
    pad_id = tokenizer.pad_token_id
    return [pad_batch(sequences[i : i + batch_size], pad_id) for i in range(0, len(sequences), batch_size)]


@torch.no_grad()
def fidelity(reference: torch.nn.Module, candidates: dict[str, torch.nn.Module], batches: list) -> dict[str, dict]:
    """For each candidate: KL(reference || candidate) per token position, averaged, and top-1 agreement.

    Computed in float64: the exact merge's KL is ~1e-8, below float32's rounding noise.
    """
    kl_sum = dict.fromkeys(candidates, 0.0)
    agree = dict.fromkeys(candidates, 0)
    positions = 0
    for inputs in batches:
        mask = inputs["attention_mask"].bool()
        positions += int(mask.sum())
        log_p = torch.log_softmax(reference(**inputs).logits.double(), -1)
        for name, candidate in candidates.items():
            log_q = torch.log_softmax(candidate(**inputs).logits.double(), -1)
            kl_sum[name] += (log_p.exp() * (log_p - log_q)).sum(-1)[mask].sum().item()
            agree[name] += (log_p.argmax(-1) == log_q.argmax(-1))[mask].sum().item()
    return {name: {"kl": kl_sum[name] / positions, "top1": agree[name] / positions} for name in candidates}


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Each prompt's greedy continuation (token ids), through the first end token."""
    end_ids = end_token_ids(tokenizer)
    answers = []
    for prompt in prompts:
        output = model.generate(**pad_batch([prompt], tokenizer.pad_token_id), do_sample=False,
                                max_new_tokens=max_new_tokens, eos_token_id=sorted(end_ids),
                                pad_token_id=tokenizer.pad_token_id)
        answers.append(until_end(output[0, len(prompt):].tolist(), end_ids))
    return answers


def until_end(tokens: list[int], end_ids: set[int]) -> list[int]:
    ends = [position for position, token in enumerate(tokens) if token in end_ids]
    return tokens[: ends[0] + 1] if ends else tokens
