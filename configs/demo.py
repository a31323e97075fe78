"""Demo of the BAIM core: 6 heterogeneous MLP VAE learners in 2 squads (digits 0-4, 5-9),
trained as one BAIM on the embedded MNIST digits, pruned, partitioned and saved."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.kind = "mlp"
    c.likelihood = "bernoulli"
    c.task_names = ["digits_0_4", "digits_5_9"]
    c.task_classes = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    # Learners: (encoder widths, latent, decoder widths, squad); 0.06M to 0.9M parameters.
    c.learners = [
        {"encoder": [32], "latent": 8, "decoder": [32], "squad": 0},
        {"encoder": [128], "latent": 16, "decoder": [128], "squad": 0},
        {"encoder": [256, 128], "latent": 32, "decoder": [128, 256], "squad": 0},
        {"encoder": [48], "latent": 8, "decoder": [48], "squad": 1},
        {"encoder": [192], "latent": 16, "decoder": [192], "squad": 1},
        {"encoder": [384, 128], "latent": 24, "decoder": [256, 384], "squad": 1},
    ]
    c.baim = ml_collections.ConfigDict({
        "k": 2, "h": 1, "gate": "topk_softmax", "noise_std": 0.5, "feature_dim": 64,
        "combine": "mixture", "dispatch": "capacity", "capacity_factor": None,
        "load_balance_weight": 0.01, "z_loss_weight": 0.001, "task_loss_weight": 1.0,
        "prior_momentum": 0.99})
    c.strategy = "finetune"
    c.num_steps = 600
    c.batch_size = 64
    c.learning_rate = 1e-3
    c.test_size = 1000
    c.eval_every = 100
    c.rho = 0.5
    c.prune_start = 100
    c.prune_end = 450
    c.prune_every = 25
    return c
