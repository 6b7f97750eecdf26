"""Toxicity classifiers behind one small interface: ``score(texts) -> [n] probabilities``.

- ``hatesonar``: HateSonar's ONNX model (offline; toxicity = 1 - P(neither)). Its
  StringNormalizer node asks for the en_US.UTF-8 locale, missing on minimal machines; we
  set ``C.UTF-8`` on the node in memory before creating the session.
- ``profanity``: alt-profanity-check (offline, sklearn). It scores identity words
  themselves ("The gay man" 0.74), so score continuations only.
- ``detoxify``: Detoxify "unbiased" (the paper's), downloads its checkpoint from the hub.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np

from attnprune.errors import UserError, missing_package


class ToxicityClassifier(ABC):
    """Maps texts to a toxicity probability in [0, 1]."""

    name: str
    offline: bool

    @abstractmethod
    def score(self, texts: Sequence[str]) -> np.ndarray:
        """``[len(texts)]`` toxicity probabilities."""


class HateSonarClassifier(ToxicityClassifier):
    """HateSonar (Davidson et al. 2017 data), ONNX; toxicity = P(hate) + P(offensive)."""

    name, offline = "hatesonar", True

    def __init__(self):
        for pkg, pip in (("hatesonar", "pip install --no-deps hatesonar==0.1.0"), ("onnxruntime", None), ("onnx", None)):
            if importlib.util.find_spec(pkg) is None:
                raise missing_package(pkg if pkg != "hatesonar" else "hatesonar", "The 'hatesonar' classifier", pip)
        import onnx
        import onnxruntime as ort
        from hatesonar.api import DEFAULT_MODEL_FILE

        model = onnx.load(str(DEFAULT_MODEL_FILE))
        for node in model.graph.node:
            if node.op_type == "StringNormalizer":
                for attr in [a for a in node.attribute if a.name == "locale"]:
                    node.attribute.remove(attr)
                node.attribute.append(onnx.helper.make_attribute("locale", "C.UTF-8"))
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session_ = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    def score(self, texts):
        if not texts:
            return np.zeros(0)
        _, probs = self.session_.run(None, {"text": np.array(list(texts), dtype=object)})
        return np.array([1.0 - p[2] for p in probs])


class ProfanityClassifier(ToxicityClassifier):
    """alt-profanity-check: linear SVM on bag of words, calibrated."""

    name, offline = "profanity", True

    def __init__(self):
        if importlib.util.find_spec("profanity_check") is None:
            raise missing_package("alt-profanity-check", "The 'profanity' classifier")
        from profanity_check import predict_prob

        self.predict_ = predict_prob

    def score(self, texts):
        return np.asarray(self.predict_(list(texts)), dtype=float) if texts else np.zeros(0)


class DetoxifyClassifier(ToxicityClassifier):
    """Detoxify 'unbiased' (unitary/unbiased-toxic-roberta), the paper's classifier; needs the hub once."""

    name, offline = "detoxify", False

    def __init__(self, device: str = "cpu"):
        if importlib.util.find_spec("detoxify") is None:
            raise missing_package("detoxify", "The 'detoxify' classifier", "pip install 'attnprune[detoxify]'")
        from detoxify import Detoxify

        try:
            self.model_ = Detoxify("unbiased", device=device)
        except Exception as exc:  # download failures surface as many exception types
            raise UserError(
                f"Detoxify could not load its checkpoint ({type(exc).__name__}); it needs network access once: "
                "use --classifier hatesonar or profanity offline."
            ) from None

    def score(self, texts):
        return np.asarray(self.model_.predict(list(texts))["toxicity"], dtype=float) if texts else np.zeros(0)


CLASSIFIERS = {"hatesonar": HateSonarClassifier, "profanity": ProfanityClassifier, "detoxify": DetoxifyClassifier}


def get_classifier(name: str) -> ToxicityClassifier:
    """Construct the classifier ``name``."""
    if name not in CLASSIFIERS:
        raise UserError(f"Unknown classifier '{name}'; choose one of {', '.join(CLASSIFIERS)}.")
    return CLASSIFIERS[name]()
