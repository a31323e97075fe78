"""The edge-cloud workflow (paper Sec. III): edges, cloud, FedAvg baseline, accounting, pipeline."""
