"""A tiny pipeline for tests: 4 edges (0.05M to 0.6M parameters), 2 tasks, 2 epochs
everywhere, all four approaches, on the embedded MNIST digits. Minutes on 2 CPU cores."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.devices = 0
    c.kind = "mlp"
    c.likelihood = "bernoulli"
    c.task_names = ["digits_0_4", "digits_5_9"]
    c.task_classes = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    # 2,000 of the 5,000 embedded digits: 300 test, 340 at the cloud, 1,360 at the edges.
    c.data = ml_collections.ConfigDict({"dataset": "embedded", "size": 2000, "test_size": 300,
                                        "cloud_fraction": 0.2,
                                        "alpha": None, "data_dir": "", "image_size": 32,
                                        "label": "Male"})
    # Edge models: (task, encoder widths, latent, decoder widths, share of the task's data).
    c.edges = [
        {"task": 0, "encoder": [32], "latent": 8, "decoder": [32], "share": 1.0},
        {"task": 0, "encoder": [256, 64], "latent": 16, "decoder": [64, 256], "share": 2.0},
        {"task": 1, "encoder": [48], "latent": 8, "decoder": [48], "share": 1.0},
        {"task": 1, "encoder": [384], "latent": 16, "decoder": [384], "share": 3.0},
    ]
    c.edge = ml_collections.ConfigDict({"epochs": 2, "batch_size": 64, "learning_rate": 1e-3})
    c.baim = ml_collections.ConfigDict({
        "k": 2, "h": 1, "gate": "topk_softmax", "noise_std": 0.5, "feature_dim": 32,
        "combine": "mixture", "dispatch": "capacity", "capacity_factor": None,
        "load_balance_weight": 0.01, "z_loss_weight": 0.001, "task_loss_weight": 1.0,
        "prior_momentum": 0.99})
    c.cloud = ml_collections.ConfigDict({
        "epochs": 2, "batch_size": 64, "learning_rate": 1e-3, "rho": 0.5, "prune_start": 0.25,
        "prune_end": 0.75, "prune_every": 2, "max_upload_params": 20_000_000})
    c.strategies = ["finetune", "freeze", "scratch"]
    c.toolkit_strategy = "finetune"
    c.personalize = ml_collections.ConfigDict({"epochs": 1, "batch_size": 64,
                                               "learning_rate": 5e-4})
    c.fl = ml_collections.ConfigDict({"rounds": 2, "batch_size": 64, "learning_rate": 1e-3})
    c.fid = ml_collections.ConfigDict({"feature_epochs": 3})
    return c
