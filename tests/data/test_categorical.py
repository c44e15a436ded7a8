"""Categorical features: encoded lazily, one mapping for training, validation, evaluation and
resume; unseen categories get the "unknown" code; the registered mlp embeds them."""

from __future__ import annotations

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
import torch

import daskdl
from daskdl import Dataset
from daskdl.checkpoint import files as checkpoint

CITIES = ["Lyon", "Nice", "Paris", "Rome", "Oslo", "Bern"]


def _houses(n=6000, seed=0, cities=CITIES) -> pd.DataFrame:
    """Prices that depend on the city (a categorical column) far more than on the area."""
    rng = np.random.default_rng(seed)
    city = rng.choice(cities, n)
    kind = pd.Categorical(rng.choice(["flat", "house"], n), categories=["flat", "house"])
    area = rng.uniform(20, 200, n)
    base = {c: 10.0 * i for i, c in enumerate(CITIES + ["Faro"])}
    price = np.array([base[c] for c in city]) + 0.05 * area + 5.0 * (kind == "house")
    return pd.DataFrame({"area": area, "city": city, "kind": kind, "price": price})


def _data(frame, **kwargs) -> Dataset:
    ddf = dd.from_pandas(frame, npartitions=4)
    return Dataset.from_dataframe(ddf, ["area", "city", "kind"], "price", **kwargs)


def test_categories_become_codes_with_unknown_for_unseen_values():
    train = _data(_houses(), categorical=["city"])  # "kind" is a category dtype: found too
    assert train.categories == {"city": sorted(CITIES), "kind": ["flat", "house"]}
    assert train.features == ["area", "city", "kind"]
    X = train.X.compute()
    frame = _houses()
    expected = [sorted(CITIES).index(c) + 1 for c in frame["city"]]
    np.testing.assert_array_equal(X[:, 1], expected)
    np.testing.assert_array_equal(X[:, 2], (frame["kind"] == "house") + 1)
    # Other data with the training codes: a city never seen, and a missing one, are 0.
    other = _houses(200, seed=1, cities=["Paris", "Faro"]).astype({"city": object})
    other.loc[0, "city"] = None
    test = _data(other, categories=train.categories)
    codes = test.X.compute()[:, 1]
    assert codes[0] == 0
    np.testing.assert_array_equal(
        codes[1:], np.where(other["city"][1:] == "Faro", 0, sorted(CITIES).index("Paris") + 1)
    )


def test_standardize_leaves_the_codes_alone():
    data = _data(_houses(), categorical=["city"]).standardize()
    X = data.X.compute()
    assert abs(X[:, 0].mean()) < 1e-3 and abs(X[:, 0].std() - 1) < 1e-3
    assert set(np.unique(X[:, 1])) == set(range(1, 7))


def test_the_mlp_embeds_categories_and_the_mapping_goes_with_the_checkpoint(client, tmp_path):
    data = _data(_houses(), categorical=["city"])
    train, val = data.split(0.2, seed=0)
    train, val = train.standardize(), val.standardize(like=train)
    run = daskdl.fit(
        client, "mlp", train, val=val, epochs=8, optimizer="adamw", lr=3e-3, weight_decay=0.0,
        batch_size=64, out=tmp_path / "run", progress=False,
    )  # fmt: skip
    embeddings = [m for m in run.model.modules() if isinstance(m, torch.nn.Embedding)]
    assert [e.num_embeddings for e in embeddings] == [7, 3]  # categories + "unknown"
    assert run.evaluate(val)["r2"] > 0.95  # the city explains most of the price
    last = checkpoint.list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    manifest = checkpoint.read_manifest(last)
    assert manifest["categories"] == data.categories
    assert manifest["features"] == ["area", "city", "kind"]
    # Resuming with other codes is refused, before any rank starts.
    other = _data(_houses(), categories={"city": ["Paris", "Rome"], "kind": ["flat", "house"]})
    with pytest.raises(ValueError, match="categorical features' categories differ"):
        daskdl.fit(
            client, "mlp", other.standardize(), epochs=9, out=tmp_path / "run", resume=True,
            progress=False,
        )  # fmt: skip
    # Data encoded with another mapping cannot be scored by this model.
    with pytest.raises(ValueError, match="categorical codes are not the training data's"):
        run.evaluate(other.standardize())


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"categorical": ["price"]}, ValueError, r"categorical columns \['price'\] are not"),
        ({"categories": ["Paris"]}, TypeError, "categories must map column names"),
        ({"categories": {"kind": ["flat"]}}, ValueError, r"no mapping for .*\['city'\]"),
    ],
)
def test_bad_categorical_arguments(kwargs, error, message):
    frame = _houses(100).astype({"city": "category"})
    with pytest.raises(error, match=message):
        _data(frame, **kwargs)


def test_text_features_must_be_named_categorical():
    with pytest.raises(TypeError, match=r"Name them in categorical=\[...\]"):
        _data(_houses(100).astype({"city": object}))


def test_a_published_data_set_keeps_its_categories(client):
    data = _data(_houses(400), categorical=["city"])
    daskdl.publish(client, "houses-categorical", data)
    try:
        got, _ = daskdl.data.sources.get(client, "houses-categorical")
        assert got.categories == data.categories and got.features == data.features
    finally:
        daskdl.data.sources.unpublish(client, "houses-categorical")
