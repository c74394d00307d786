"""Genetic-algorithm mask search: populations scored with ``vmap``, every generation in one
compiled ``lax.scan``, sharded over devices when there are several.

Example:
  >>> import jax, jaxprune
  >>> from jaxprune import ga
  >>> model = jaxprune.MLP(in_features=10, hidden=(20,), out_features=7)
  >>> params = model.init(jax.random.key(0))
  >>> x = jax.random.normal(jax.random.key(1), (64, 10))
  >>> y = jax.random.randint(jax.random.key(2), (64,), 0, 7)
  >>> res = ga.search(model, params, x, y, 'hidden_0', key=jax.random.key(3),
  ...                 config=ga.GAConfig(population_size=20, generations=3), progress=False)
  >>> int(res.kept) == int(res.mask.sum())
  True
"""

from jaxprune.ga import operators
from jaxprune.ga.operators import crossover_pairs
from jaxprune.ga.operators import crossover_pairs_from
from jaxprune.ga.operators import flip_mutation
from jaxprune.ga.operators import mutate
from jaxprune.ga.operators import mutate_from
from jaxprune.ga.operators import one_point_crossover
from jaxprune.ga.operators import select_tournament
from jaxprune.ga.operators import tournament
from jaxprune.ga.operators import update_hall_of_fame
from jaxprune.ga.mask_search import AccuracyFitness
from jaxprune.ga.mask_search import GAConfig
from jaxprune.ga.mask_search import GAHistory
from jaxprune.ga.mask_search import GAHyperparams
from jaxprune.ga.mask_search import GAResult
from jaxprune.ga.mask_search import GAState
from jaxprune.ga.mask_search import UserFitness
from jaxprune.ga.mask_search import ask
from jaxprune.ga.mask_search import breed
from jaxprune.ga.mask_search import default_mesh
from jaxprune.ga.mask_search import fast_path_applies
from jaxprune.ga.mask_search import generation_keys
from jaxprune.ga.mask_search import init
from jaxprune.ga.mask_search import initial_population
from jaxprune.ga.mask_search import make_fitness
from jaxprune.ga.mask_search import penalized
from jaxprune.ga.mask_search import run
from jaxprune.ga.mask_search import search
from jaxprune.ga.mask_search import tell
