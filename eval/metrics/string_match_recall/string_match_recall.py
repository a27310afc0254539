"""string_match_recall: RULER's `string_match_all`, as an `evaluate` module kept in the repo.

For each prediction, the fraction of its reference strings that occur in it (case-insensitive substring);
the metric is the mean over predictions, in [0, 1]. A needle task with 4 values scores 0.75 when 3 of
the 4 numbers appear in the answer.

    import evaluate
    m = evaluate.load("/abs/path/to/eval/metrics/string_match_recall")
    m.compute(predictions=["7 and 9"], references=[["7", "8"]])  # {"string_match_recall": 0.5}
"""

import datasets
import evaluate

_CITATION = """@article{hsieh2024ruler, title={RULER: What's the Real Context Size of Your Long-Context Language
Models?}, author={Hsieh, Cheng-Ping and others}, journal={arXiv:2404.06654}, year={2024}}"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated strings.
    references: list of lists of reference strings (every one is expected in the prediction).
Returns:
    string_match_recall: mean over predictions of the fraction of references found (case-insensitive), in [0, 1].
"""


def recall(prediction: str, references) -> float:
    if not references:
        raise ValueError("every prediction needs at least one reference string")
    text = prediction.lower()
    return sum(1.0 for r in references if r.lower() in text) / len(references)


@evaluate.utils.file_utils.add_start_docstrings(__doc__, _KWARGS_DESCRIPTION)
class StringMatchRecall(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references):
        if not predictions:
            return {"string_match_recall": 0.0}
        scores = [recall(p, r) for p, r in zip(predictions, references)]
        return {"string_match_recall": sum(scores) / len(scores)}
