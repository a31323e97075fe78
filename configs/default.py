"""The main job on the embedded MNIST digits: 6 heterogeneous edges (0.05M to 1.0M
parameters, 20x apart) in 2 tasks (digits 0-4, digits 5-9), the BAIM trained with each of the
three strategies, the toolkit, personalisation at every edge, and the FedAvg baseline with as
many rounds as the BAIM route has cloud epochs."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.devices = 0  # 0: all devices
    c.kind = "mlp"
    c.likelihood = "bernoulli"
    c.task_names = ["digits_0_4", "digits_5_9"]
    c.task_classes = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    # All 5,000 digits: 1,000 held out for testing, 20% of the rest at the cloud.
    c.data = ml_collections.ConfigDict({"dataset": "embedded", "size": 5000, "test_size": 1000,
                                        "cloud_fraction": 0.2})
    # Edge models: (task, encoder widths, latent, decoder widths, share of the task's data).
    c.edges = [
        {"task": 0, "encoder": [32], "latent": 8, "decoder": [32], "share": 1.0},
        {"task": 0, "encoder": [128], "latent": 16, "decoder": [128], "share": 1.5},
        {"task": 0, "encoder": [512, 128], "latent": 32, "decoder": [128, 512], "share": 2.0},
        {"task": 1, "encoder": [48], "latent": 8, "decoder": [48], "share": 1.0},
        {"task": 1, "encoder": [192], "latent": 16, "decoder": [192], "share": 1.5},
        {"task": 1, "encoder": [512, 256], "latent": 32, "decoder": [256, 512], "share": 2.0},
    ]
    c.edge = ml_collections.ConfigDict({"epochs": 10, "batch_size": 64, "learning_rate": 1e-3})
    c.baim = ml_collections.ConfigDict({
        "k": 2, "h": 1, "gate": "topk_softmax", "noise_std": 0.5, "feature_dim": 64,
        "combine": "mixture", "dispatch": "capacity", "capacity_factor": None,
        "load_balance_weight": 0.01, "z_loss_weight": 0.001, "task_loss_weight": 1.0,
        "prior_momentum": 0.99})
    c.cloud = ml_collections.ConfigDict({
        "epochs": 10, "batch_size": 64, "learning_rate": 1e-3, "rho": 0.5, "prune_start": 0.2,
        "prune_end": 0.7, "prune_every": 5, "max_upload_params": 20_000_000})
    c.strategies = ["finetune", "freeze", "scratch"]
    c.toolkit_strategy = "finetune"
    c.personalize = ml_collections.ConfigDict({"epochs": 3, "batch_size": 64,
                                               "learning_rate": 5e-4})
    c.fl = ml_collections.ConfigDict({"rounds": 10, "batch_size": 64, "learning_rate": 1e-3})
    return c
