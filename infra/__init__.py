"""Everything that touches the outside world: settings, storage, Ray, MLflow, deployment."""
