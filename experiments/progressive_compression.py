r"""Progressive compression of an autoencoder's hidden layer by distinctiveness (Gedeon).

An autoencoder 10-10-10 (sigmoid hidden, linear output, mean squared error) is trained on the
10 features (standardised on the training split). Then hidden units are removed one at a time
with ``jaxprune.pruners.progressive_distinctiveness``: at each step constant units are folded
into the output bias and the most similar pair (smallest angle between the units' activation
vectors on the training patterns) is merged, the removed unit's outgoing weights added to the
kept one's. After each removal the study records the units kept, the training reconstruction
loss, the smallest angle between the remaining units, and the test reconstruction loss, with no
retraining. Several runs (each its own split and initialisation) train as one vmapped program.

Usage:
  python -m experiments.progressive_compression
  python -m experiments.progressive_compression --hidden=10 --epochs=2000 --runs=5
  python -m experiments.progressive_compression --data=sfew_features --data_path=SFEW.xlsx
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import jaxprune
from jaxprune import data as data_lib
from jaxprune.pruners import progressive_distinctiveness
from experiments import _flags
from experiments import _report
from experiments import _store
from experiments import _mlp_common as mc

STUDY = "progressive_compression"
GROUP = "hidden_0"


@dataclasses.dataclass(frozen=True)
class Config:
  """Every setting of the study; each field is also a flag (``_flags.define_flags``)."""
  hidden: int = _flags.field(10, "Hidden units of the autoencoder.")
  runs: int = _flags.field(3, "Runs (own split and initialisation each).")
  epochs: int = _flags.field(500, "Training epochs.")
  batch_size: int = _flags.field(32, "Minibatch size.")
  lr: float = _flags.field(0.001, "Adam learning rate.")
  test_fraction: float = _flags.field(0.2, "Share of each run's test split.")
  constant_tol: float = _flags.field(1e-6,
                                     "A unit whose activation range is below this is constant.")
  seed: int = _flags.field(0, "Random seed.")

  @classmethod
  def quick(cls, **kw) -> "Config":
    base = dict(hidden=5, runs=2, epochs=2)
    base.update(kw)
    return cls(**base)

  def validate(self) -> None:
    _flags.check_seed(self.seed)
    _flags.check_positive(hidden=self.hidden, minimum=2)
    _flags.check_positive(runs=self.runs, epochs=self.epochs, batch_size=self.batch_size)
    _flags.check_finite("lr", self.lr, positive=True)
    if not 0 < self.test_fraction < 1:
      _flags.fail(f"--test_fraction must lie in (0, 1), got {self.test_fraction}.")
    if not self.constant_tol >= 0:
      _flags.fail(f"--constant_tol must be >= 0, got {self.constant_tol}.")


def _splits(ds, cfg: Config):
  out = []
  for r in range(cfg.runs):
    train, test = mc.train_test_or_fail(ds, cfg.test_fraction, _store.split_seed(cfg.seed, r))
    train, test, _ = data_lib.standardize_split(train, test)
    out.append((train.x, test.x))
  return out


def _mse(model, x):
  x = jnp.asarray(x)
  return lambda p: jnp.mean(jnp.square(model.apply(p, x) - x))


def _finite(values) -> bool:
  """Whether every value is a finite number: None (NaN read back from JSON) and the +-1e308
  that ``_store.to_jsonable`` writes for an infinity (a result cached before this check) are
  not."""
  a = np.asarray([np.nan if v is None else v for v in np.ravel(np.asarray(values, object))],
                 np.float64)
  return bool(np.all(np.isfinite(a) & (np.abs(a) < 1e308)))


def _overflow_cause(model, params, ds, cfg: Config, r: int, x_te) -> str:
  """Which value of run ``r``'s test part (``x_te``, standardised) makes the squared
  reconstruction error overflow float32: the first test cell whose squared error is not
  finite, else (the mean overflowed) the largest standardised value; named by the example's
  name and the feature's column header where the data have them, with its value as loaded."""
  _, test = mc.train_test_or_fail(ds, cfg.test_fraction, _store.split_seed(cfg.seed, r))
  with np.errstate(over="ignore", invalid="ignore"):
    err = np.asarray(model.apply(params, jnp.asarray(x_te)), np.float32) - x_te
    bad = ~np.isfinite(np.square(err))
  i, j = (np.argwhere(bad)[0] if bad.any()
          else np.unravel_index(np.argmax(np.abs(x_te)), x_te.shape))
  names = test.info.get("names")
  row = f"test example {names[i]}" if names is not None else f"test row {i}"
  header = ds.info.get("header")
  shown = ""
  if header is not None and len(header) == x_te.shape[1] + 2 and header[j + 2]:
    shown = f" ({header[j + 2]})"   # SFEW layout: name, label, then the features
  what = ("its squared reconstruction error" if bad.any() else "the sum of squared errors")
  what += " overflows float32 (whose largest value is 3.4e38)"
  return (f"{row} has feature {j + 1}{shown} = {float(test.x[i, j]):.3g}, "
          f"{float(x_te[i, j]):.3g} after standardising on the training part, and {what}")


def run(cfg: Config, workdir: str = "workdir", *, data: str = "features",
        data_path: str | None = None) -> dict:
  """Runs (or resumes) the study; returns the results written to results.json."""
  cfg.validate()
  _flags.refuse_image_data(data, "needs feature vectors")
  ds = _store.load_data(data, data_path)
  if ds.x.ndim != 2:
    _flags.fail(f"--data={data} has inputs of shape {ds.x.shape[1:]}; this study needs "
                "feature vectors (use --data=features, digits_features or sfew_features).")
  d = ds.x.shape[1]
  model = jaxprune.Autoencoder(in_features=d, hidden=(cfg.hidden,))
  splits = _splits(ds, cfg)  # before the study's folder: a split error leaves nothing behind
  study = _store.Study(STUDY, {**dataclasses.asdict(cfg), "data": data,
                               "data_path": data_path}, workdir)

  def train():
    init = jax.vmap(model.init)(mc.stack_keys([_store.config_key(cfg.seed, "init", r)
                                               for r in range(cfg.runs)]))
    x, w = mc.pad_stack([s[0] for s in splits])
    keys = mc.stack_keys([_store.config_key(cfg.seed, "train", r) for r in range(cfg.runs)])
    params, _ = jaxprune.fit_many(model, init, x, x, w, key=keys, epochs=cfg.epochs,
                                  batch_size=cfg.batch_size, learning_rate=cfg.lr,
                                  log_every=max(cfg.epochs // 10, 1),
                                  desc=f"train autoencoder ({cfg.runs} runs)")
    return params

  with mc.diverging_training_fails("lr", cfg.lr):
    stacked = study.cached_tree("params", train)
  progress = _report.Progress(cfg.runs, "progressive removal")

  def check_finite(r, res):
    """Refuses a run whose losses are not all finite (before it is cached, and again when it
    is read back): the cache writes an infinity as 1e308, which the summary would average
    into a finite-looking number. A diverging training is refused by ``fit_many`` already;
    what is left is a test input so far out that its reconstruction error overflows."""
    if not _finite(res["train_loss"]):
      _flags.fail(f"Run {r}'s training reconstruction loss is not finite "
                  f"({[float(v) for v in np.ravel(res['train_loss'])][:3]}...) during "
                  "progressive removal; lower --lr, or check the data for extreme values.")
    if not _finite(res["test_loss"]):
      params = jax.tree.map(lambda a: jnp.asarray(a[r]), stacked)
      cause = _overflow_cause(model, params, ds, cfg, r, splits[r][1])
      _flags.fail(f"Run {r}'s test reconstruction loss is not finite: {cause}. The study does "
                  "not report an infinite loss as a number: fix or remove that value in the "
                  "data (or rescale that feature), then run again.")

  def one(r):
    params = jax.tree.map(lambda a: jnp.asarray(a[r]), stacked)
    x_tr, x_te = splits[r]
    masks = jaxprune.unit_masks_ones(model)
    # One trajectory (angles on the training patterns), scored by the training and test losses.
    prune = progressive_distinctiveness(model, GROUP, _mse(model, x_tr),
                                        metrics={"test_loss": _mse(model, x_te)})
    _, _, rep = prune(params, masks, jnp.asarray(x_tr), cfg.constant_tol)
    n = int(rep.count)
    um = np.asarray(rep.unit_masks)[:n]
    removed = [[]] + [np.flatnonzero(um[s - 1] & ~um[s]).tolist() for s in range(1, n)]
    res = {"units_kept": np.asarray(rep.units_kept)[:n], "train_loss": np.asarray(rep.loss)[:n],
           "test_loss": np.asarray(rep.metrics["test_loss"])[:n], "min_angle": np.asarray(rep.min_angle)[:n],
           "removed": removed}
    check_finite(r, res)
    return res

  runs = []
  for r in range(cfg.runs):
    runs.append(study.cached(f"progressive_run{r}", lambda: one(r)))
    check_finite(r, runs[-1])
    progress.step(f"run {r}")

  rows = []
  for r, res in enumerate(runs):
    for s in range(len(res["units_kept"])):
      ma = res["min_angle"][s]
      rows.append({"run": r, "step": s, "units_kept": res["units_kept"][s],
                   "removed": " ".join(map(str, res["removed"][s])) or "-",
                   "train_loss": res["train_loss"][s], "test_loss": res["test_loss"][s],
                   "min_angle_deg": "" if ma is None else ma})
  # Mean over runs per number of units kept (runs can remove constants together).
  mean_rows = []
  for k in sorted({u for res in runs for u in res["units_kept"]}, reverse=True):
    vals = [(res["train_loss"][i], res["test_loss"][i], res["min_angle"][i])
            for res in runs for i, u in enumerate(res["units_kept"]) if u == k]
    angles = [v[2] for v in vals if v[2] is not None]
    mean_rows.append({"units_kept": k, "runs": len(vals),
                      "train_loss": mc.pm([v[0] for v in vals], 4),
                      "test_loss": mc.pm([v[1] for v in vals], 4),
                      "min_angle_deg": mc.pm(angles, 1) if angles else "n/a"})
  final = {"test_loss_unpruned": mc.mean_std([res["test_loss"][0] for res in runs]),
           "test_loss_final": mc.mean_std([res["test_loss"][-1] for res in runs]),
           "units_final": [int(res["units_kept"][-1]) for res in runs]}

  out = {"summary": mean_rows, "steps": rows, "final": final, "runs": runs,
         "data": {"name": data, "source": ds.info.get("source", data), "examples": len(ds),
                  "train_size": len(splits[0][0]), "test_size": len(splits[0][1])}}
  study.write_results(out)
  t_mean = _report.write_table(study.dir, "summary", mean_rows)
  t_steps = _report.write_table(study.dir, "steps", rows)

  plt = _report.pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for r, res in enumerate(runs):
    ax.plot(res["units_kept"], res["train_loss"], "o-", color=f"C{r}", label=f"run {r} train")
    ax.plot(res["units_kept"], res["test_loss"], "s--", color=f"C{r}", alpha=0.6,
            label=f"run {r} test")
  ax.invert_xaxis()
  ax.set(xlabel="hidden units kept", ylabel="reconstruction loss (MSE, standardised units²)",
         title=f"Progressive compression of a {d}-{cfg.hidden}-{d} autoencoder")
  ax2 = ax.twinx()
  for r, res in enumerate(runs):
    a = [np.nan if v is None else v for v in res["min_angle"]]
    ax2.plot(res["units_kept"], a, ":", color=f"C{r}", alpha=0.5)
  ax2.set_ylabel("smallest angle between kept units (degrees, dotted)")
  ax.legend(fontsize=7)
  _report.save_figure(fig, study.path("progressive.png"))

  stand_in = ("" if data.startswith("sfew") else " These bundled data are a stand-in for the "
              "SFEW features; the numbers are not SFEW numbers.")
  (u_m, u_s), (f_m, f_s) = final["test_loss_unpruned"], final["test_loss_final"]
  share = mc.split_share(splits, cfg.test_fraction, ds.groups is not None)
  study.write_report(f"Progressive compression ({d}-{cfg.hidden}-{d} autoencoder)", [
      ("Data", f"`--data={data}`: {ds.info.get('source', data)}; {cfg.runs} runs, each with its "
               f"own {mc.split_kind(ds)} {share} split (standardised on its training "
               f"part) and initialisation.{stand_in}\n\nTraining: Adam lr "
               f"{cfg.lr:g}, batch {cfg.batch_size}, {cfg.epochs} epochs, MSE."),
      ("Result", f"Test loss of the trained autoencoder: {u_m:.4f} ± {u_s:.4f}; after removing "
                 f"units down to {final['units_final']} unit(s) without retraining: "
                 f"{f_m:.4f} ± {f_s:.4f} (mean ± std over runs).\n\n![](progressive.png)"),
      ("Mean over runs", t_mean),
      ("Every step", "Removal order: at each step constant units first, then the more similar "
                     "pair's higher-index unit (merged into the lower one).\n\n" + t_steps),
  ])
  return out


def main(argv):
  _flags.run_main(argv, Config, run)


if __name__ == "__main__":
  _flags.define_flags(Config, default_data="features")
  _flags.run_binary(main)
