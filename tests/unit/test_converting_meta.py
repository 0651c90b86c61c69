"""tuneline/converting.py on Meta-style consolidated.*.pth checkpoints: they convert into a Hugging Face model with
the same logits."""

import json
from pathlib import Path

import pytest
import sentencepiece
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from tuneline.converting import META_CONCAT_DIM1, META_TO_HF, convert

N_HEADS, N_KV_HEADS = 4, 2


def unpermute_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face's split-halves rotary layout back to Meta's interleaved one."""
    rows, cols = weight.shape
    return weight.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def write_meta_checkpoint(model: LlamaForCausalLM, out_dir: Path, shards: int) -> None:
    hf_to_meta = {}
    for layer in range(model.config.num_hidden_layers):
        for meta, hf in META_TO_HF.items():
            hf_to_meta[hf.format(i=layer)] = meta.format(i=layer)
    state = {}
    for name, tensor in model.state_dict().items():
        meta_name = hf_to_meta[name]
        if meta_name.endswith("wq.weight"):
            tensor = unpermute_rotary(tensor, N_HEADS)
        elif meta_name.endswith("wk.weight"):
            tensor = unpermute_rotary(tensor, N_KV_HEADS)
        state[meta_name] = tensor.clone()
    for index in range(shards):
        part = {}
        for name, tensor in state.items():
            if tensor.dim() == 1:
                part[name] = tensor
            else:
                dim = 1 if any(key in name for key in META_CONCAT_DIM1) else 0
                part[name] = tensor.chunk(shards, dim=dim)[index].clone()
        torch.save(part, out_dir / f"consolidated.{index:02d}.pth")
    config = model.config
    params = {"dim": config.hidden_size, "n_layers": config.num_hidden_layers, "n_heads": N_HEADS,
              "n_kv_heads": N_KV_HEADS, "norm_eps": config.rms_norm_eps, "vocab_size": config.vocab_size}
    (out_dir / "params.json").write_text(json.dumps(params))


def train_sentencepiece(out_dir: Path) -> None:
    corpus = out_dir / "corpus.txt"
    corpus.write_text("\n".join(["the tumour is benign", "the tumour is malignant", "worst radius 12.5"] * 20))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out_dir / "tokenizer"), vocab_size=40, model_type="bpe",
        minloglevel=2,
    )
    corpus.unlink()
    (out_dir / "tokenizer.vocab").unlink()


@pytest.mark.parametrize("shards", [1, 2])
def test_meta_checkpoint_converts_to_same_logits(tmp_path: Path, shards: int) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=N_HEADS, num_key_value_heads=N_KV_HEADS, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    src, out = tmp_path / "meta", tmp_path / "hf"
    src.mkdir()
    out.mkdir()
    write_meta_checkpoint(model, src, shards)
    train_sentencepiece(src)

    assert convert(src_dir=src, out_dir=out, tokenizer_dir=tmp_path / "tokenizer", dtype="float32", max_shard_size=10**9, write_pth=False) == "meta"

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert len(tokenizer) == 40 and tokenizer("the tumour is benign")["input_ids"], "the SentencePiece vocabulary was lost"
    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    input_ids = torch.randint(0, 40, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(converted(input_ids).logits, model(input_ids).logits)
