"""Export: the merged model as GGUF files for llama.cpp and Ollama, each checked against the merged model.

    python -m stages.export MERGED_DIR DATASET_DIR EXPORT_DIR METRICS_FILE

Writes one GGUF file per `export.types` (model-<type>.gguf) and an Ollama Modelfile to EXPORT_DIR. Each file
carries the tokenizer, the chat template, the BOS/EOS/pad and end-of-turn tokens and the merged model's
lineage (`tuneline audit FILE.gguf` reads it). It is written tensor by tensor (tuneline/exporting.py), so the
export holds one tensor at a time whatever the model's size.

The Modelfile's TEMPLATE is the chat template translated (tuneline/ollama.py), its SYSTEM the system prompt
the data was trained with, its stops the tokens that end the model's turns: `ollama create NAME -f Modelfile`
in EXPORT_DIR gives a model prompted as it was trained.

metrics/export.json reports, for each file: size, KL and top-1 agreement against the merged model on the
held-out conversations the merge uses, and the share of greedy answers equal to the merged model's, as
transformers' GGUF loader reads the file and, with llama-cpp-python installed, as llama.cpp runs it. A float
file (f32, f16, bf16) must match the merged model as closely as the merged model rounded to that dtype does;
`export.max_kl` bounds the others.
"""

import sys
from pathlib import Path

from tuneline.artifacts import atomic_dir, write_json
from tuneline.errors import exit_on_error
from tuneline.exporting import export
from tuneline.params import ExportParams, load_section


@exit_on_error
def main() -> None:
    if len(sys.argv) != 5:
        sys.exit("usage: python -m stages.export MERGED_DIR DATASET_DIR EXPORT_DIR METRICS_FILE")
    params: ExportParams = load_section("export")
    merged_dir, dataset_dir, export_dir, metrics_file = map(Path, sys.argv[1:])
    with atomic_dir(export_dir) as tmp:
        metrics = export(model_dir=merged_dir, dataset_dir=dataset_dir, params=params, out_dir=tmp)
        write_json(metrics_file, metrics)
    for export_type, figures in metrics["files"].items():
        print(f"export: {figures['file']} {figures['size_bytes'] / 1e6:.0f} MB, KL {figures['kl']:.2e}, "
              f"top-1 {figures['top1_agreement']:.4f}, greedy answers equal {figures['greedy_equal']:.2f}")
    if not metrics["files"]:
        print("export: export.types is empty; nothing exported")


if __name__ == "__main__":
    main()
