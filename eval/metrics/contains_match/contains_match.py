"""contains_match: substring exact match for extractive QA, as an `evaluate` module kept in the repo.

A prediction scores 1 when, after normalisation, it contains any of its reference answers, else 0; the
metric is the mean, in [0, 1]. Normalisation: lower case, quotes and backticks removed, runs of
whitespace collapsed to one space, surrounding spaces stripped. So the answer 'utf-8' matches the
prediction ` "utf-8".` and the grammar rule `"assert" expression` matches `"assert"   expression`.

    import evaluate
    m = evaluate.load("/abs/path/to/eval/metrics/contains_match")
    m.compute(predictions=[' "utf-8"'], references=[["'utf-8'"]])  # {"contains_match": 1.0}
"""

import re

import datasets
import evaluate

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated strings.
    references: list of lists of acceptable answers.
Returns:
    contains_match: fraction of predictions that contain (after normalisation) one of their answers, in [0, 1].
"""

_QUOTES = re.compile(r"[\"'`]")
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    return _SPACE.sub(" ", _QUOTES.sub("", text.lower())).strip()


def contains(prediction: str, references) -> float:
    if not references:
        raise ValueError("every prediction needs at least one reference answer")
    pred = normalize(prediction)
    return 1.0 if any(normalize(r) and normalize(r) in pred for r in references) else 0.0


@evaluate.utils.file_utils.add_start_docstrings(__doc__, _KWARGS_DESCRIPTION)
class ContainsMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references):
        if not predictions:
            return {"contains_match": 0.0}
        scores = [contains(p, r) for p, r in zip(predictions, references)]
        return {"contains_match": sum(scores) / len(scores)}
