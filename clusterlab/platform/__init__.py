"""Ray + MLflow glue. The only package that imports ``ray`` or ``mlflow``."""
