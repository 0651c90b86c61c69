"""tuneline/scoring.py and eval_report.py: likelihood scoring, generation in every decoding mode, each metric kind
on outputs with known answers (a perfect, a wrong and a malformed output each give the expected figure), the
eval pages."""

import json
import math

import pytest
import torch

from tuneline.errors import TunelineError
from tuneline.params import validate_section



@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from tuneline.modeling import load_full_model

    return load_full_model(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def eval_rows(tiny_dataset_dir):
    from tuneline.modeling import read_split

    return read_split(tiny_dataset_dir / "eval.parquet")


def direct_logprob(model, ids: list[int], start: int, end: int) -> float:
    """The plain definition: sum over tokens start..end-1 of log p(token | everything before), one row alone."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    log_probs = torch.log_softmax(logits, -1)
    return sum(log_probs[t - 1, ids[t]].item() for t in range(start, end))


class TestEvaluate:
    PAD = 0  # the tiny tokenizer's <|endoftext|>

    def test_left_padded_batch_equals_rows_alone_and_direct_computation(self, tiny_model, eval_rows):
        from tuneline.scoring import completion_logprobs

        pairs = [
            (list(row.input_ids[: row.prompt_length - cut]), list(ids))
            for cut, row in zip((0, 7, 15), eval_rows[eval_rows["label"].notna()].itertuples())
            for ids in row.choice_ids
        ]
        assert len({len(prompt) for prompt, _ in pairs}) == 3  # really different lengths
        batched = completion_logprobs(tiny_model, self.PAD, pairs, batch_size=len(pairs), desc="batched")
        alone = completion_logprobs(tiny_model, self.PAD, pairs, batch_size=1, desc="alone")
        for (prompt, completion), lp_batched, lp_alone in zip(pairs, batched, alone):
            assert lp_batched == pytest.approx(lp_alone, abs=1e-4)
            ids = prompt + completion
            assert lp_alone == pytest.approx(direct_logprob(tiny_model, ids, len(prompt), len(ids)), abs=1e-4)

    def test_answer_loss_is_the_mean_over_trained_tokens(self, tiny_model, eval_rows):
        from tuneline.scoring import answer_losses, mean_loss

        rows = eval_rows.iloc[:5]
        total = tokens = 0
        for row in rows.itertuples():
            trained = [t for t, label in enumerate(row.labels) if label != -100]
            total -= sum(direct_logprob(tiny_model, list(row.input_ids), t, t + 1) for t in trained)
            tokens += len(trained)
        losses = answer_losses(tiny_model, self.PAD, rows, batch_size=3, desc="loss")
        assert mean_loss(losses) == pytest.approx(total / tokens, rel=1e-4)

    def test_classify_picks_the_most_likely_choice(self, tiny_model, eval_rows):
        from tuneline.scoring import classify

        rows = eval_rows[eval_rows["label"].notna()].iloc[:6]
        predicted = classify(tiny_model, self.PAD, rows, batch_size=4, desc="classify")
        assert len(predicted) == len(rows)
        for row, prediction in zip(rows.itertuples(), predicted):
            prompt = list(row.input_ids[: row.prompt_length])
            scores = {choice: direct_logprob(tiny_model, prompt + list(ids), len(prompt), len(prompt) + len(ids))
                      for choice, ids in zip(row.choices, row.choice_ids)}
            assert prediction == max(scores, key=scores.get)

    def test_logistic_regression_baseline(self, tiny_dataset_dir, eval_rows):
        from tuneline.scoring import logistic_regression_accuracy
        from tuneline.modeling import read_split

        train = read_split(tiny_dataset_dir / "train.parquet")
        accuracy = logistic_regression_accuracy(train[train["features"].notna()], eval_rows[eval_rows["features"].notna()])
        assert 0.8 <= accuracy <= 1.0


# ----------------------------------------------------------------------------------------------- metrics


class TestFreeText:
    def test_exact_match_ignores_case_and_spacing_only(self):
        from tuneline.scoring import exact_match

        assert exact_match(["Paris", "  the  Moon ", "Madrid."], ["paris", "the moon", "Madrid"]) == pytest.approx(2 / 3)
        assert exact_match(["Rome"], ["Paris"]) == 0.0

    @pytest.mark.parametrize(
        "output, reference, expected",
        [
            ("the cat sat on the mat", "the cat sat on the mat", 1.0),  # perfect
            ("dogs bark loudly", "the cat sat", 0.0),  # wrong
            ("", "the cat sat", 0.0),  # malformed (empty)
            # LCS "the cat on the mat" = 5 words; precision 5/6, recall 5/6
            ("the cat lay on the mat", "the cat sat on the mat", 5 / 6),
            # LCS "cat mat" = 2; precision 2/2, recall 2/6 -> F1 = 2 * 1 * (1/3) / (4/3) = 0.5
            ("cat mat", "the cat sat on the mat", 0.5),
        ],
    )
    def test_rouge_l(self, output, reference, expected):
        from tuneline.scoring import rouge_l

        assert rouge_l(output, reference) == pytest.approx(expected)


REFERENCE_MCQ = "Question: What falls from clouds?\nA. snow\nB. sand\nC. salt\nD. sun\nAnswer: A"


class TestMcq:
    @pytest.mark.parametrize(
        "output, valid",
        [
            (REFERENCE_MCQ, True),
            ("Question: Which is hot?\nA. ice\nB. fire\nC. snow\nD. rain\nAnswer: B", True),
            ("Question: Which is hot?\nA. ice\nB. fire\nC. snow\nAnswer: B", False),  # three options
            ("Question: Which is hot?\nA. ice\nB. ice\nC. snow\nD. rain\nAnswer: B", False),  # options not distinct
            ("Question: Which is hot?\nA. ice\nB. fire\nC. snow\nD. rain", False),  # no key
            ("Question: Which is hot?\nA. ice\nB. fire\nC. snow\nD. rain\nAnswer: E", False),  # key not A-D
            ("fire", False),
        ],
    )
    def test_parse_mcq(self, output, valid):
        from tuneline.scoring import parse_mcq

        parsed = parse_mcq(output)
        assert (parsed is not None) == valid
        if valid:
            assert parsed["key"] in "ABCD" and len(parsed["options"]) == 4

    def test_scores_for_perfect_wrong_key_and_malformed_outputs(self):
        from tuneline.scoring import mcq_scores

        wrong_key = REFERENCE_MCQ.replace("Answer: A", "Answer: C")
        malformed = "Question: What falls from clouds?\nA. snow"
        assert mcq_scores([REFERENCE_MCQ], [REFERENCE_MCQ]) == {"mcq_format_valid": 1.0, "mcq_key_accuracy": 1.0}
        assert mcq_scores([wrong_key], [REFERENCE_MCQ]) == {"mcq_format_valid": 1.0, "mcq_key_accuracy": 0.0}
        assert mcq_scores([malformed], [REFERENCE_MCQ]) == {"mcq_format_valid": 0.0, "mcq_key_accuracy": 0.0}
        scores = mcq_scores([REFERENCE_MCQ, wrong_key, malformed], [REFERENCE_MCQ] * 3)
        assert scores == {"mcq_format_valid": pytest.approx(2 / 3), "mcq_key_accuracy": pytest.approx(1 / 3)}
        # without a reference key there is no key accuracy to report
        assert mcq_scores([REFERENCE_MCQ], ["a free-text reference"]) == {"mcq_format_valid": 1.0}


class TestLabel:
    def test_accuracy_and_macro_f1(self):
        from tuneline.scoring import label_scores

        truth = ["benign", "benign", "malignant", "malignant"]
        assert label_scores(truth, truth) == {"accuracy": 1.0, "macro_f1": 1.0}
        assert label_scores(["malignant", "malignant", "benign", "benign"], truth) == {"accuracy": 0.0, "macro_f1": 0.0}
        # all "benign": accuracy 0.5; F1 benign = 2/3, malignant = 0 -> macro 1/3
        scores = label_scores(["benign"] * 4, truth)
        assert scores["accuracy"] == 0.5 and scores["macro_f1"] == pytest.approx(1 / 3)


class TestMergedMatchesQlora:
    METRICS = {"accuracy": {"base": 0.5, "qlora": 0.9, "merged": 0.9, "logistic_regression": 0.93},
               "eval_loss": {"base": 5.2, "qlora": 0.2, "merged": 0.2000001}, "examples": {"label": 10}}

    def test_an_exact_merge_allows_no_change_in_rates(self):
        from tuneline.scoring import merge_tolerances, merged_vs_qlora

        tolerances = merge_tolerances({"kl": 3e-11, "top1_agreement": 1.0}, max_new_tokens=16)
        assert tolerances["rate"] == 0.0
        assert merged_vs_qlora(self.METRICS, tolerances) == []
        drifted = {**self.METRICS, "accuracy": {**self.METRICS["accuracy"], "merged": 0.8}}
        problems = merged_vs_qlora(drifted, tolerances)
        assert len(problems) == 1 and problems[0].startswith("accuracy: merged 0.8 vs QLoRA 0.9")

    def test_a_lossy_merge_allows_what_it_predicts(self):
        from tuneline.scoring import merge_tolerances, merged_vs_qlora

        tolerances = merge_tolerances({"kl": 0.49, "top1_agreement": 0.70}, max_new_tokens=1)
        drifted = {**self.METRICS, "accuracy": {**self.METRICS["accuracy"], "merged": 0.8},
                   "eval_loss": {**self.METRICS["eval_loss"], "merged": 0.5}}
        assert merged_vs_qlora(drifted, tolerances) == []  # 0.1 < 0.3 and 0.3 < 10 * sqrt(0.49)


# --------------------------------------------------------------------------------------------- generation


def generation_params(**changes):
    from tuneline.params import GenerationParams

    defaults = dict(mode="greedy", max_new_tokens=6, num_beams=3, temperature=0.8, top_k=20, top_p=0.9,
                    repetition_penalty=1.0, seed=7)
    return GenerationParams(**(defaults | changes))


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_dataset_dir):
    from tuneline.modeling import load_tokenizer

    return load_tokenizer(tiny_dataset_dir / "tokenizer")


@pytest.fixture(scope="module")
def prompts(eval_rows) -> list[list[int]]:
    """Prompts of different lengths, so batches are really left-padded."""
    return [list(row.input_ids[: row.prompt_length - cut]) for cut, row in zip((0, 9, 4), eval_rows.itertuples())]


class TestGeneration:
    @pytest.mark.parametrize("mode", ["greedy", "beam", "sample"])
    def test_every_decoding_mode_answers_every_prompt(self, tiny_model, tiny_tokenizer, prompts, mode):
        from tuneline.scoring import generate

        assert len({len(prompt) for prompt in prompts}) == 3
        answers = generate(tiny_model, tiny_tokenizer, prompts, generation_params(mode=mode), batch_size=3, desc=mode)
        assert len(answers) == len(prompts) and all(isinstance(answer, str) for answer in answers)
        again = generate(tiny_model, tiny_tokenizer, prompts, generation_params(mode=mode), batch_size=3, desc=mode)
        assert again == answers  # sampling too: the seed is in params

    def test_greedy_batched_with_left_padding_equals_one_prompt_at_a_time(self, tiny_model, tiny_tokenizer, prompts):
        from tuneline.scoring import generate

        params = generation_params(max_new_tokens=5)
        batched = generate(tiny_model, tiny_tokenizer, prompts, params, batch_size=3, desc="batched")
        alone = [generate(tiny_model, tiny_tokenizer, [prompt], params, batch_size=1, desc="alone")[0] for prompt in prompts]
        assert batched == alone
        # and greedy is the argmax, token by token
        ids = list(prompts[0])
        for _ in range(5):
            with torch.no_grad():
                ids.append(int(tiny_model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        new = ids[len(prompts[0]):]
        ends = [i for i, token in enumerate(new) if token == tiny_tokenizer.eos_token_id]
        assert alone[0] == tiny_tokenizer.decode(new[: ends[0] if ends else None], skip_special_tokens=True).strip()

    def test_sampling_seed_changes_the_draw(self, tiny_model, tiny_tokenizer, prompts):
        from tuneline.scoring import generate

        draws = {tuple(generate(tiny_model, tiny_tokenizer, prompts, generation_params(mode="sample", temperature=2.0,
                                                                                      top_k=0, top_p=1.0, seed=seed),
                                batch_size=3, desc="sample")) for seed in range(4)}
        assert len(draws) > 1

    def test_decoding_options_follow_the_mode(self):
        from tuneline.scoring import decoding_options

        assert decoding_options(generation_params(mode="greedy")) == {
            "max_new_tokens": 6, "repetition_penalty": 1.0, "do_sample": False, "num_beams": 1}
        assert decoding_options(generation_params(mode="beam"))["num_beams"] == 3
        sample = decoding_options(generation_params(mode="sample"))
        assert sample["do_sample"] is True and (sample["temperature"], sample["top_k"], sample["top_p"]) == (0.8, 20, 0.9)


# -------------------------------------------------------------------------------------- the whole stage


@pytest.fixture(scope="module")
def stage_result(tiny_model_dir, trained_adapter, tiny_dataset_dir, tiny_params):
    """evaluate() on the tiny model with the tiny params' evaluate section (every eval row, all kinds)."""
    from tuneline.scoring import evaluate

    params = validate_section("evaluate", {**tiny_params["evaluate"], "max_examples": 0})
    return evaluate(base_dir=tiny_model_dir, adapter_dir=trained_adapter[0], merged_dir=tiny_model_dir,
                    dataset_dir=tiny_dataset_dir, merge_metrics={"kl": 1e-12, "top1_agreement": 1.0}, params=params)


class TestEvaluateStage:
    def test_figures_per_kind_for_every_model(self, stage_result):
        metrics, rows, outputs = stage_result
        assert set(metrics["examples"]) == {"label", "free_text"} and sum(metrics["examples"].values()) == len(rows)
        for name in ("eval_loss", "accuracy", "macro_f1", "exact_match", "rouge_l", "answer_loss", "perplexity"):
            assert set(metrics[name]) >= {"base", "qlora", "merged"}, name
        assert "logistic_regression" in metrics["accuracy"]
        assert metrics["perplexity"]["base"] == pytest.approx(math.exp(metrics["answer_loss"]["base"]))
        assert all(len(outputs[name]["answers"]) == len(rows) for name in ("base", "qlora", "merged"))
        # the "merged" model here is the base itself, so it does not match the QLoRA model: flagged
        assert metrics["merged_matches_qlora"] is False

    def test_eval_dir_tables(self, stage_result, tmp_path):
        from tuneline.eval_report import write_eval_dir

        _, rows, outputs = stage_result
        write_eval_dir(tmp_path, rows, outputs)
        table = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
        assert len(table) == len(rows)
        assert set(table[0]) == {"ref", "kind", "question", "reference", "base", "qlora", "merged"}
        assert table[0]["reference"] == rows.iloc[0]["reference"]
        page = (tmp_path / "generations.html").read_text()
        assert page.count("<tr>") == len(rows) + 1 and "&lt;" not in page.split("<table")[0]
        predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
        assert len(predictions) == (rows["kind"] == "label").sum()
        confusion = json.loads((tmp_path / "confusion.json").read_text())
        assert confusion == [{"actual": p["label"], "predicted": p["merged"]} for p in predictions]

    def test_kind_override(self, eval_rows, tiny_params):
        from tuneline.scoring import select_rows

        params = validate_section("evaluate", {**tiny_params["evaluate"], "max_examples": 0, "kind": "free_text"})
        assert set(select_rows(eval_rows, params)["kind"]) == {"free_text"}
        labelled_only = validate_section("evaluate", {**tiny_params["evaluate"], "max_examples": 0, "kind": "label"})
        with pytest.raises(TunelineError, match=r"evaluate\.kind: label needs a label on every eval row"):
            select_rows(eval_rows, labelled_only)

    def test_lm_eval_is_skipped_cleanly_without_the_extra(self, tmp_path, capsys, monkeypatch):
        import builtins

        from tuneline.scoring import run_lm_eval
        from tuneline.params import LmEvalParams

        assert run_lm_eval(tmp_path, LmEvalParams(tasks=[], limit=5), batch_size=2) == {}
        real_import = builtins.__import__

        def without_lm_eval(name, *args, **kwargs):
            if name == "lm_eval":
                raise ImportError("No module named 'lm_eval'")
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", without_lm_eval)  # as in an install without the extra
        assert run_lm_eval(tmp_path, LmEvalParams(tasks=["arc_easy"], limit=5), batch_size=2) == {
            "lm_eval_skipped": "not installed"}
        assert "pip install 'tuneline[lm-eval]'" in capsys.readouterr().out
