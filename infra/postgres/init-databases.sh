#!/bin/sh
# Run once by the postgres image on an empty data volume: MLflow gets POSTGRES_DB (mlflow), Prefect its own database.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -c "CREATE DATABASE ${PREFECT_DB:-prefect} OWNER \"$POSTGRES_USER\""
