"""Dataset: turn the users' data, in any of six formats, into checked, tokenized training examples.

    python -m stages.dataset DATA_DIR TOKENIZER_DIR OUT_DIR

Reads every source of `dataset.sources` (files or globs under DATA_DIR, which dvc.yaml tracks by content;
scikit-learn's bundled tables; Hugging Face datasets at a pinned revision), turns each row into a
conversation, cleans the lot, renders it with `dataset.template`, tokenizes it with the loss on the
assistant turns only, checks the tokens, balances labels, splits train/eval and writes to OUT_DIR:

    train.parquet, eval.parquet   input_ids, attention_mask, labels (-100 = no loss) and what evaluation
                                  needs (prompt_length, label, choices with their tokenized answers)
    train.jsonl, eval.jsonl       the rendered text of every example, to read
    tokenizer/                    the tokenizer the ids belong to (its pad token made distinct from EOS)
    dataset_card.json, .md        counts per cleaning step and per source, token lengths, label balance,
                                  sha256 of inputs and outputs, tokenizer and template identity, examples
    token_lengths.json            the token-length histogram, for `dvc plots`
    lineage.json                  what the models trained on this data inherit: sha256 of every input and
                                  of the two splits, the dataset params and the cleaning counts

Cleaning runs in this order, each step counted: normalise (Unicode NFC, line ends, trailing blanks) ->
drop empty -> exact dedup -> near-dedup (a hash of the text lowercased, without punctuation or spacing) ->
length (conversations over `max_length` tokens are cut back to their last whole answer that fits, or
dropped) -> label balancing by downsampling -> stratified split -> source weights (train split only).
`tuneline dataset preview` shows the first rendered examples of each source with the trained spans marked.
Both warn in one line on stderr about a named template the tokenizer's own chat template does not use.
The steps live in tuneline/data/ (rows, formats, cleaning, templates, tokens, build, card).
"""

import sys
from pathlib import Path

from tuneline.artifacts import atomic_dir
from tuneline.data import build_dataset, load_dataset_tokenizer, summary_line, write_outputs
from tuneline.errors import exit_on_error
from tuneline.params import DatasetParams, load_section


@exit_on_error
def main() -> None:
    if len(sys.argv) != 4:
        sys.exit("usage: python -m stages.dataset DATA_DIR TOKENIZER_DIR OUT_DIR")
    params: DatasetParams = load_section("dataset")
    data_dir, tokenizer_dir, out_dir = map(Path, sys.argv[1:])
    tokenizer = load_dataset_tokenizer(tokenizer_dir)
    built = build_dataset(params=params, data_dir=data_dir, tokenizer=tokenizer, tokenizer_dir=tokenizer_dir)
    with atomic_dir(out_dir) as tmp:
        card = write_outputs(built, params, tokenizer, tokenizer_dir, tmp)
    print(summary_line(card["steps"]))


if __name__ == "__main__":
    main()
