"""tuneline/token_loss.py: the chunked next-token loss gives the log-probabilities, entropy, top-1 and gradients of
the full logits, and the train stage's loss, gradients and logged figures with it are TRL's own."""

import pytest
import torch

from tuneline.params import TrainParams
from tuneline.token_loss import ChunkedNextTokenLoss


@pytest.mark.parametrize("with_bias", [False, True])
def test_chunks_give_what_the_full_logits_give(with_bias):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=generator, requires_grad=True)
    weight, bias = torch.randn(50, 16, generator=generator), torch.randn(50, generator=generator)
    bias = bias if with_bias else None
    logits = hidden.detach() @ weight.T + (bias if with_bias else 0)
    # Every third target the most likely token, the others drawn: is_top1 has both answers to get right.
    drawn = torch.randint(0, 50, (37,), generator=generator)
    targets = torch.where(torch.arange(37) % 3 == 0, logits.argmax(-1), drawn)
    upstream = torch.rand(37, generator=generator)  # per-token weights, as a mean over uneven batches gives

    log_probs, entropy, is_top1 = ChunkedNextTokenLoss.apply(hidden, weight, bias, targets, 8)  # 5 chunks, 1 short
    (log_probs * upstream).sum().backward()
    chunked_grad, hidden.grad = hidden.grad, None

    full = (hidden @ weight.T + (bias if with_bias else 0)).log_softmax(-1)
    expected = full.gather(1, targets[:, None]).squeeze(1)
    (expected * upstream).sum().backward()
    assert torch.allclose(log_probs, expected, atol=1e-5)
    assert torch.allclose(entropy, -(full.exp() * full).sum(-1), atol=1e-5)
    assert torch.equal(is_top1, logits.argmax(-1) == targets)
    assert 0 < is_top1.sum() < 37
    assert torch.allclose(chunked_grad, hidden.grad, atol=1e-5)


def _trainer(tiny_model_dir, tiny_dataset_dir, params: TrainParams, tmp_path, monkeypatch, *, ours: bool):
    """The train stage's SFTTrainer on the tiny 4-bit model (with TRL's own loss unless `ours`), LoRA B non-zero."""
    from datasets import Dataset

    import tuneline.training
    from tuneline.modeling import QuantSpec, load_quantized_model, load_tokenizer

    model = load_quantized_model(tiny_model_dir, QuantSpec(params.quant_type, params.double_quant, "float32"))
    with monkeypatch.context() as patch:
        if not ours:
            patch.setattr(tuneline.training, "score_trained_tokens_only", lambda model: None)
        trainer = tuneline.training.build_trainer(
            model=model, tokenizer=load_tokenizer(tiny_dataset_dir / "tokenizer"),
            split=Dataset.from_dict({"input_ids": [[1, 2]], "labels": [[-100, 2]]}), params=params,
            run_dir=tmp_path / ("ours" if ours else "trl"), callbacks=[])
    torch.manual_seed(0)
    for name, param in trainer.model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.1)  # the adapter matters: its gradients reach lora_A too
    return trainer


def test_the_train_stage_trains_with_trls_loss_gradients_and_figures(tiny_model_dir, tiny_params, tiny_dataset_dir,
                                                                     tmp_path, monkeypatch):
    """The same packed batch, the same dropout masks (same seed): TRL's fused head and ours give the same loss, the
    same adapter gradients and the same logged entropy and token accuracy, and ours is the one the stage uses."""
    from test_training import varied_examples
    from transformers import set_seed

    import tuneline.token_loss

    params = TrainParams(**{**tiny_params["train"], "compute_dtype": "float32", "optim": "adamw_torch"})
    calls = []
    apply = ChunkedNextTokenLoss.apply
    monkeypatch.setattr(tuneline.token_loss.ChunkedNextTokenLoss, "apply",
                        lambda *args: calls.append(len(args[3])) or apply(*args))
    results = {}
    for name in ("trl", "ours"):
        trainer = _trainer(tiny_model_dir, tiny_dataset_dir, params, tmp_path, monkeypatch, ours=name == "ours")
        batch = trainer.data_collator(varied_examples(tiny_dataset_dir))
        trainer.model.train()
        set_seed(0)
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        grads = {key: param.grad.clone() for key, param in trainer.model.named_parameters() if param.requires_grad}
        figures = {key: trainer._metrics["train"][key][-1] for key in ("entropy", "mean_token_accuracy")}
        results[name] = (loss.item(), grads, figures)
    trained = int((batch["labels"][:, 1:] != -100).sum())
    assert calls == [trained]  # ours scored the trained positions only, once; TRL's run never reached it
    assert trained < batch["input_ids"].numel() - 1
    (trl_loss, trl_grads, trl_figures), (our_loss, our_grads, our_figures) = results["trl"], results["ours"]
    assert our_loss == pytest.approx(trl_loss, abs=1e-5)
    assert our_figures == pytest.approx(trl_figures, abs=1e-5)
    assert trl_grads.keys() == our_grads.keys() and any("lora_A" in key for key in our_grads)
    for key, grad in trl_grads.items():
        assert torch.allclose(our_grads[key], grad, atol=1e-5), key
