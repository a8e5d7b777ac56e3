"""The one place that talks to MLflow (client.py) and the buffer whose failures never stop training."""
