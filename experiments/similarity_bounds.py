r"""Similar and complementary bounds (Dixit): which hidden-unit pairs do wider angle bounds find?

A 10-H-7 MLP (sigmoid hidden, softmax output), trained with batch 1, Adam at learning rate
0.001 for 1200 epochs, for H in {30, 50, 100} and several runs (each run its own train/test
split, stratified by class or by person when the data carry persons, and initialisation).
Then, as separate experiments on the trained network, without retraining:

* similar-only pruning at 45 degrees (pairs with angle < 45 merged);
* complementary-only pruning at 140 degrees (pairs with angle > 140 removed);
* the default bounds, similar-only at 15 and complementary-only at 165;

each reporting the pairs found with their angles and the test accuracy before and after the
removal; the report says when no pair qualifies. Angles use the activations on the training
split (sigmoid outputs shifted by -0.5).

All runs and hidden sizes train together as ONE vmapped program: a network of H units is
trained inside the widest one with its extra units masked (masked training keeps them exactly
zero, so it computes the H-unit network), then compacted to H units.

Usage:
  python -m experiments.similarity_bounds                  # bundled stand-in data
  python -m experiments.similarity_bounds --epochs=300 --runs=5
  python -m experiments.similarity_bounds --data=sfew_features --data_path=SFEW.xlsx
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import jaxprune
from jaxprune import data as data_lib
from jaxprune.pruners import distinctiveness
from jaxprune.pruners import pairwise_angles
from jaxprune.pruners import report_actions
from experiments import _flags
from experiments import _report
from experiments import _store
from experiments import _mlp_common as mc

STUDY = "similarity_bounds"
GROUP = "hidden_0"
LAST_UNIT_NOTE = ("the kept unit is the layer's last: a sweep that would remove every unit "
                  "keeps one")


@dataclasses.dataclass(frozen=True)
class Config:
  """Every setting of the study; each field is also a flag (``_flags.define_flags``)."""
  hidden: tuple = _flags.field((30, 50, 100), "Hidden sizes H.", low=2)
  runs: int = _flags.field(3, "Runs per hidden size (own split and initialisation).")
  epochs: int = _flags.field(1200, "Training epochs.")
  batch_size: int = _flags.field(1, "Minibatch size (the study uses 1).")
  lr: float = _flags.field(0.001, "Adam learning rate.")
  test_fraction: float = _flags.field(0.2, "Share of each run's test split.")
  similar_deg: float = _flags.field(45.0, "Similar-only bound (degrees).")
  complementary_deg: float = _flags.field(140.0, "Complementary-only bound (degrees).")
  default_similar_deg: float = _flags.field(15.0,
                                            "The default similar bound, also tried (degrees).")
  default_complementary_deg: float = _flags.field(
      165.0, "The default complementary bound, also tried (degrees).")
  seed: int = _flags.field(0, "Random seed.")

  @classmethod
  def quick(cls, **kw) -> "Config":
    base = dict(hidden=(6, 12), runs=2, epochs=2, batch_size=8)
    base.update(kw)
    return cls(**base)

  def validate(self) -> None:
    for name in ("hidden", "runs", "epochs", "batch_size"):
      v = getattr(self, name)
      if any(isinstance(x, bool) or not isinstance(x, (int, np.integer))
             for x in (v if name == "hidden" else (v,))):
        _flags.fail(f"--{name} must be whole numbers, got {v!r}." if name == "hidden" else
                    f"--{name} must be a whole number, got {v!r}.")
    if any(h < 2 for h in self.hidden):
      _flags.fail(f"--hidden sizes must be at least 2 (a pair needs two units), got "
                  f"{list(self.hidden)}.")
    _flags.check_fields(self)  # the seed; --hidden: at least one size, none twice
    _flags.check_positive(runs=self.runs, epochs=self.epochs, batch_size=self.batch_size)
    _flags.check_finite("lr", self.lr, positive=True)
    if not 0 < self.test_fraction < 1:
      _flags.fail(f"--test_fraction must lie in (0, 1), got {self.test_fraction}.")
    for name in ("similar_deg", "complementary_deg", "default_similar_deg",
                 "default_complementary_deg"):
      v = getattr(self, name)
      if not 0 <= v <= 180:
        _flags.fail(f"--{name} must be an angle in [0, 180] degrees, got {v}.")

  def experiments(self) -> list[tuple[str, float]]:
    """(rule, threshold) experiments, in report order."""
    return [("similar", self.similar_deg), ("complementary", self.complementary_deg),
            ("similar", self.default_similar_deg),
            ("complementary", self.default_complementary_deg)]


def _model(h: int) -> jaxprune.MLP:
  return jaxprune.MLP(in_features=10, hidden=(h,), out_features=7, activation="sigmoid")


def _embed(small, h_max: int):
  """An H-unit MLP's params inside an ``h_max``-unit MLP (extra units all zero)."""
  p = small["params"]
  h = p["hidden_0"]["bias"].shape[0]
  pad = h_max - h
  return {"params": {
      "hidden_0": {"kernel": jnp.pad(p["hidden_0"]["kernel"], ((0, 0), (0, pad))),
                   "bias": jnp.pad(p["hidden_0"]["bias"], (0, pad))},
      "out": {"kernel": jnp.pad(p["out"]["kernel"], ((0, pad), (0, 0))),
              "bias": p["out"]["bias"]}}}


def _splits(ds, cfg: Config):
  out = []
  for r in range(cfg.runs):
    train, test = mc.train_test_or_fail(ds, cfg.test_fraction, _store.split_seed(cfg.seed, r))
    train, test, _ = data_lib.standardize_split(train, test)
    out.append((train, test))
  return out


def train_all(cfg: Config, splits, study: _store.Study):
  """Every (H, run) network, trained as one vmapped program; cached as npz."""
  h_max = max(cfg.hidden)
  big = _model(h_max)
  plan = [(h, r) for h in cfg.hidden for r in range(cfg.runs)]

  def train():
    params, masks = [], []
    for h, r in plan:
      small = _model(h).init(_store.config_key(cfg.seed, "init", h, r))
      params.append(_embed(small, h_max))
      unit = {GROUP: jnp.arange(h_max) < h}
      masks.append(jaxprune.expand(params[-1], big, unit))
    stack = lambda *a: jnp.stack(a)
    x, w = mc.pad_stack([splits[r][0].x for _, r in plan])
    y, _ = mc.pad_stack([splits[r][0].y for _, r in plan])
    keys = mc.stack_keys([_store.config_key(cfg.seed, "train", h, r) for h, r in plan])
    trained, _ = jaxprune.fit_many(
        big, jax.tree.map(stack, *params), x, y, w, key=keys, epochs=cfg.epochs,
        batch_size=cfg.batch_size, learning_rate=cfg.lr, masks=jax.tree.map(stack, *masks),
        log_every=max(cfg.epochs // 20, 1),
        desc=f"train {len(plan)} networks (H {list(cfg.hidden)} x {cfg.runs} runs)")
    return trained

  with mc.diverging_training_fails("lr", cfg.lr):
    stacked = study.cached_tree("params", train)
  out = {}
  for i, (h, r) in enumerate(plan):
    p = jax.tree.map(lambda a: jnp.asarray(a[i]), stacked)
    small, _ = big.compact(p, {GROUP: np.arange(h_max) < h})
    out[(h, r)] = small
  return out


def prune_one(cfg: Config, h: int, r: int, params, split) -> dict:
  """All bound experiments on one trained network (no retraining)."""
  model = _model(h)
  train, test = split
  acts = model.activations(params, jnp.asarray(train.x), GROUP)
  shift = 0.5
  ang = np.asarray(pairwise_angles(np.asarray(acts).T - shift))
  iu = np.triu_indices(h, 1)
  angles = ang[iu]
  before_test = mc.score(model, params, test.x, test.y)
  before_train = mc.score(model, params, train.x, train.y)
  masks = jaxprune.unit_masks_ones(model)
  out = {"H": h, "run": r, "test_acc_before": before_test, "train_acc_before": before_train,
         "min_angle": float(np.nanmin(angles)), "max_angle": float(np.nanmax(angles)),
         "angles": np.round(angles, 4), "experiments": []}
  for rule, thr in cfg.experiments():
    prune = distinctiveness(model, GROUP, similar=rule == "similar",
                            complementary=rule == "complementary", constants=False)
    if rule == "similar":
      new_p, new_m, report = prune(params, masks, acts, thr, 180.0)
    else:
      new_p, new_m, report = prune(params, masks, acts, 0.0, thr)
    # A sweep never empties the layer: when it would remove every unit, the action that would
    # have removed the last one lists it as kept (``kept_last``), as the unit mask does.
    pairs = [{"kept": list(a["kept"]), "removed": list(a["removed"]), "angle": a["angle"],
              **({"kept_last": True} if a.get("kept_last") else {})}
             for a in report_actions(report)]
    qualifying = int(np.sum(angles < thr) if rule == "similar" else np.sum(angles > thr))
    out["experiments"].append({
        "rule": rule, "threshold": thr, "pairs": pairs, "qualifying_pairs": qualifying,
        "hidden_after": int(np.sum(np.asarray(new_m[GROUP]))),
        "test_acc_after": mc.score(model, new_p, test.x, test.y),
        "train_acc_after": mc.score(model, new_p, train.x, train.y)})
  return out


def summarise(cfg: Config, nets: list[dict]) -> tuple[list, list]:
  rows, pair_rows = [], []
  for k, (rule, thr) in enumerate(cfg.experiments()):
    for h in cfg.hidden:
      sel = [n for n in nets if n["H"] == h]
      ex = [n["experiments"][k] for n in sel]
      n_pairs = [len(e["pairs"]) for e in ex]
      rows.append({
          "rule": rule, "threshold_deg": thr, "H": h,
          "runs_with_pairs": f"{sum(p > 0 for p in n_pairs)}/{len(ex)}",
          "pairs_applied_mean": float(np.mean(n_pairs)),
          "qualifying_pairs_mean": float(np.mean([e["qualifying_pairs"] for e in ex])),
          "hidden_after_mean": float(np.mean([e["hidden_after"] for e in ex])),
          "test_acc_before": mc.pm([n["test_acc_before"] for n in sel]),
          "test_acc_after": mc.pm([e["test_acc_after"] for e in ex]),
          "note": "no pair qualifies" if not any(n_pairs) else ""})
      for n, e in zip(sel, ex):
        if not e["pairs"]:
          pair_rows.append({"rule": rule, "threshold_deg": thr, "H": h, "run": n["run"],
                            "kept": "", "removed": "", "angle_deg": "",
                            "note": f"no pair qualifies (angles {n['min_angle']:.1f}-"
                                    f"{n['max_angle']:.1f})"})
        for p in e["pairs"]:
          pair_rows.append({"rule": rule, "threshold_deg": thr, "H": h, "run": n["run"],
                            "kept": " ".join(map(str, p["kept"])) or "-",
                            "removed": " ".join(map(str, p["removed"])),
                            "angle_deg": round(p["angle"], 3),
                            "note": LAST_UNIT_NOTE if p.get("kept_last") else ""})
  return rows, pair_rows


def figure_title(cfg: Config) -> str:
  """The angle figure's title, naming the bounds drawn (the flags' values)."""
  return (f"Pairwise angles (dashed: {cfg.similar_deg:g}/{cfg.complementary_deg:g}, "
          f"dotted: {cfg.default_similar_deg:g}/{cfg.default_complementary_deg:g})")


def figure(cfg: Config, nets: list[dict], path: str) -> None:
  plt = _report.pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  bins = np.linspace(0, 180, 37)
  for i, h in enumerate(cfg.hidden):
    a = np.concatenate([np.asarray(n["angles"], float) for n in nets if n["H"] == h])
    ax.hist(a, bins=bins, histtype="step", density=True, color=f"C{i}", label=f"H={h}")
  for thr, ls in ((cfg.similar_deg, "--"), (cfg.complementary_deg, "--"),
                  (cfg.default_similar_deg, ":"), (cfg.default_complementary_deg, ":")):
    ax.axvline(thr, color="k", ls=ls, lw=1)
  ax.set(xlabel="angle between hidden units (degrees)", ylabel="density of unit pairs",
         title=figure_title(cfg))
  ax.legend()
  _report.save_figure(fig, path)


def run(cfg: Config, workdir: str = "workdir", *, data: str = "features",
        data_path: str | None = None) -> dict:
  """Runs (or resumes) the study; returns the results written to results.json."""
  cfg.validate()
  ds = mc.load_features(data, data_path)
  splits = _splits(ds, cfg)  # before the study's folder: a split error leaves nothing behind
  study = _store.Study(STUDY, {**dataclasses.asdict(cfg), "data": data,
                               "data_path": data_path}, workdir)
  nets = train_all(cfg, splits, study)
  progress = _report.Progress(len(nets), "prune")
  results = []
  for (h, r), params in nets.items():
    results.append(study.cached(f"prune_H{h}_run{r}",
                                lambda: prune_one(cfg, h, r, params, splits[r])))
    progress.step(f"H={h} run {r}")
  rows, pair_rows = summarise(cfg, results)
  out = {"summary": rows, "pairs": pair_rows, "networks": results,
         "data": {"name": data, "source": ds.info.get("source", data), "examples": len(ds),
                  "train_size": len(splits[0][0]), "test_size": len(splits[0][1])}}
  study.write_results(out)
  t_sum = _report.write_table(study.dir, "summary", rows)
  t_pairs = _report.write_table(study.dir, "pairs", pair_rows)
  figure(cfg, results, study.path("angles.png"))
  none = [f"{r['rule']} {r['threshold_deg']:g}° at H={r['H']}" for r in rows if r["note"]]
  stand_in = ("" if data.startswith("sfew") else " These bundled data are a stand-in for the "
              "SFEW features; the numbers are not SFEW numbers.")
  share = mc.split_share(splits, cfg.test_fraction, ds.groups is not None)
  study.write_report("Similar and complementary bounds (10-H-7 MLP)", [
      ("Data", f"`--data={data}`: {ds.info.get('source', data)}; {cfg.runs} runs, each with its "
               f"own {mc.split_kind(ds)} {share} split "
               f"(standardised on its training part) and initialisation.{stand_in}\n\n"
               f"Training: sigmoid hidden layer, Adam lr {cfg.lr:g}, batch {cfg.batch_size}, "
               f"{cfg.epochs} epochs."),
      ("Summary", "Each rule alone (similar-only merges the pair, keeping the lower index; "
                  "complementary-only removes both, except that a sweep never removes the layer's "
                  "last unit), constants not removed, no retraining. "
                  "Accuracies in percent (mean ± std over runs). *qualifying* counts pairs past "
                  "the threshold; *applied* counts those used (a unit acts once per sweep).\n\n"
                  + t_sum + ("\n\nNo pair qualifies for: " + "; ".join(none) + "." if none
                             else "")),
      ("Pairs found", t_pairs),
      ("Angles", "![](angles.png)"),
  ])
  return out


def main(argv):
  _flags.run_main(argv, Config, run)


if __name__ == "__main__":
  _flags.define_flags(Config, default_data="features")
  _flags.run_binary(main)
