"""Dataset building: the users' rows, in any of six formats, as checked, tokenized training examples.

rows (reading sources) -> formats (rows as conversations) -> cleaning -> templates (rendering) -> tokens
(ids and loss mask), run in order by build.build_dataset; card writes the splits, the card and the lineage.
"""

from tuneline.data.build import STEPS, Built, build_dataset, preview, summary_line
from tuneline.data.card import write_outputs
from tuneline.data.rows import resolve_files
from tuneline.data.tokens import load_dataset_tokenizer

__all__ = ["STEPS", "Built", "build_dataset", "load_dataset_tokenizer", "preview", "resolve_files", "summary_line",
           "write_outputs"]
