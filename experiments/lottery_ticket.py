"""Lottery tickets: one-shot percentile pruning, rewinding to the initial weights, retraining.

A CNN is fine-tuned on the images (ResNet-18 from ``--pretrained``, else a smaller CNN trained
from scratch). For each fraction (20, 50, 70 and 90 percent by default) the fine-tuned network
is pruned once by layerwise magnitude percentile (every kernel; biases and batch-norm
parameters kept), the kept weights are rewound to the initial weights (the pretrained weights,
or the from-scratch initialisation) and the pruned network is retrained with its mask for
``--retrain_epochs``. The same is done with random pruning of the same counts. Reported: test
accuracy per epoch, one figure per fraction, and the first epoch at which each reaches the
unpruned (fine-tuned) test accuracy, or 'never'.

  python -m experiments.lottery_ticket --workdir=/tmp/work
"""

from __future__ import annotations

from absl import flags

import jaxprune
from experiments import _cnn_common as cc
from experiments import _cnn_finetune as ft
from experiments import _common
from jaxprune import pruners

FLAGS = flags.FLAGS
STUDY = "lottery_ticket"
METHODS = ("magnitude", "random")

def define_flags() -> None:
  """Defines this binary's flags (only when run as a program, so tests can import it)."""
  ft.define_flags()
  flags.DEFINE_list("fractions", ["0.2", "0.5", "0.7", "0.9"],
                    "Fractions of every kernel's weights pruned (one-shot, per layer).")


def prune_and_rewind(method: str, trained, init_params, fraction, *, key):
  """One-shot layerwise pruning of ``trained``, kept weights rewound to ``init_params``.

  Args:
    method: 'magnitude' (smallest |w| of the trained weights) or 'random' (same counts).
    trained: the fine-tuned variables.
    init_params: the saved initial variables (same structure).
    fraction: fraction of each kernel's weights to prune.
    key: PRNG key for random pruning.

  Returns:
    ``(rewound, weight_masks)``: ``rewound`` equals ``init_params`` where the mask keeps a
    weight and is 0 where it prunes one.
  """
  if method == "magnitude":
    _, masks, _ = pruners.magnitude_prune(trained, None, fraction, scope="layer")
  elif method == "random":
    _, masks, _ = pruners.random_prune(trained, None, fraction, key=key, scope="layer")
  else:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
  return jaxprune.rewind(trained, init_params, masks), masks


def main(argv):
  _common.check_no_args(argv)
  s = ft.settings()
  fractions = list(_common.parse_list("fractions", FLAGS.fractions, float, low=0.0, high=1.0,
                                      unique=False))
  s["fractions"] = fractions
  setup = ft.prepare(s)
  model = setup.model
  study = _common.Study(STUDY, s)
  prog = _common.Progress(1 + len(METHODS) * len(fractions), STUDY)

  tuned, tuned_rec = ft.finetune(study, setup)
  prog.step("fine-tuned")
  target = tuned_rec["test_accuracy"][-1]

  per_fraction, rows = {}, []
  for frac in fractions:
    recs = {}
    for method in METHODS:
      def run(method=method, frac=frac):
        rewound, masks = prune_and_rewind(method, tuned, setup.init_params, frac,
                                          key=_common.config_key(s["seed"], "random_mask", frac))
        _, rec = cc.train(model, rewound, setup.split, masks=masks,
                          key=_common.config_key(s["seed"], "retrain", frac),
                          epochs=s["retrain_epochs"], learning_rate=s["learning_rate"],
                          batch_size=s["batch_size"], desc=f"{method} {frac:g}")
        kept, total = jaxprune.count_weights(masks)
        return {**rec, "weights_kept": kept, "weights_total": total}

      rec = study.cached(f"{method}_{frac:g}", run)
      rec["first_epoch_reaching_unpruned"] = cc.first_epoch_reaching(rec["test_accuracy"], target)
      recs[method] = rec
      rows.append({"fraction": frac, "method": method,
                   "acc_rewound": rec["test_accuracy"][0],
                   "acc_final": rec["test_accuracy"][-1],
                   "acc_best": max(rec["test_accuracy"][1:]),
                   "first_epoch_reaching_unpruned": rec["first_epoch_reaching_unpruned"]})
      prog.step(f"{method} {frac:g} retrained")
    per_fraction[f"{frac:g}"] = recs
    cc.plot_curves(
        study.path(f"lottery_{round(100 * frac)}pct.png"),
        f"{100 * frac:g}% of each kernel pruned, rewound to initial weights",
        {f"{m} pruning, rewound": recs[m]["test_accuracy"] for m in METHODS},
        ylabel="test accuracy (fraction)", xlabel="retraining epoch (0 = rewound)",
        hline=("unpruned (fine-tuned)", target))

  study.write_results({"finetune": tuned_rec, "unpruned_test_accuracy": target,
                       "fractions": per_fraction, "description": setup.description})
  table = _common.write_table(study.dir, "lottery", rows,
                              ["fraction", "method", "acc_rewound", "acc_final", "acc_best",
                               "first_epoch_reaching_unpruned"])
  figs = "\n\n".join(f"![](lottery_{round(100 * f)}pct.png)" for f in fractions)
  study.write_report("Lottery tickets: percentile pruning with rewinding", [
      ("Set-up", setup.description + f" Unpruned (fine-tuned) test accuracy: {target:.4f}. "
       "Pruning: one-shot, per layer, every kernel (biases and batch-norm parameters kept); "
       "kept weights rewound to the initial weights, then retrained with the mask for "
       f"{s['retrain_epochs']} epochs (same schedule for magnitude and random masks)."),
      ("Test accuracy and the first epoch reaching the unpruned accuracy", table),
      ("Figures", figs),
  ])
  print(f"Wrote {study.dir}/REPORT.md")


if __name__ == "__main__":
  define_flags()
  _common.run_binary(main)
