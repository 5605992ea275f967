"""Training through the swarm with several trainers that average what they learn.

* averaging.py - `CollaborationConfig` and `collaborative_optimizer`: a `hivemind.Optimizer` over the client's
                 DHT that averages the trainable parameters' gradients of every trainer in a run, or with
                 `local_steps` > 1 a `LocalStepsOptimizer` (DiLoCo: local AdamW steps, averaged Nesterov outer steps)
* trainer.py   - `FinetuneConfig` and `finetune`: text file -> token chunks -> training loop -> saved adapter
                 (what `swarm finetune` runs)
* metrics.py   - `TrainingMetrics`: loss, the run's epoch, trainers in the run (`swarm finetune --metrics-port`)
"""

from swarm.training.averaging import CollaborationConfig, LocalStepsOptimizer, collaborative_optimizer

__all__ = ["CollaborationConfig", "LocalStepsOptimizer", "collaborative_optimizer"]
