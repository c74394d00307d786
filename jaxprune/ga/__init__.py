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
from jaxprune.ga.fitness import AccuracyFitness
from jaxprune.ga.strategy import GAConfig
from jaxprune.ga.strategy import GAHistory
from jaxprune.ga.strategy import GAHyperparams
from jaxprune.ga.strategy import GAResult
from jaxprune.ga.strategy import GAState
from jaxprune.ga.fitness import UserFitness
from jaxprune.ga.strategy import ask
from jaxprune.ga.strategy import breed
from jaxprune.ga.loop import default_mesh
from jaxprune.ga.fitness import fast_path_applies
from jaxprune.ga.strategy import generation_keys
from jaxprune.ga.strategy import init
from jaxprune.ga.strategy import initial_population
from jaxprune.ga.fitness import make_fitness
from jaxprune.ga.fitness import penalized
from jaxprune.ga.loop import run
from jaxprune.ga.mask_search import search
from jaxprune.ga.strategy import tell
