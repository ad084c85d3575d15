"""Create the MLflow artifact bucket on MinIO if it is missing (the `minio-bucket` one-shot of infra/compose.yaml).

Usage:
    python infra/minio_bucket.py            # reads MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
                                            # MLFLOW_BUCKET (default: mlflow)
"""

from __future__ import annotations

import os
import sys
import time


def main() -> int:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    bucket = os.environ.get("MLFLOW_BUCKET", "mlflow")
    s3 = boto3.client("s3", endpoint_url=os.environ["MLFLOW_S3_ENDPOINT_URL"])
    deadline = time.monotonic() + 60
    while True:
        try:
            existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
            break
        except (BotoCoreError, ClientError) as e:  # MinIO still starting
            if time.monotonic() > deadline:
                print(f"error: minio_bucket: {os.environ['MLFLOW_S3_ENDPOINT_URL']} unreachable: {e}", file=sys.stderr)
                return 1
            time.sleep(2)
    if bucket in existing:
        print(f"bucket {bucket!r} already exists")
    else:
        s3.create_bucket(Bucket=bucket)
        print(f"bucket {bucket!r} created")
    return 0


if __name__ == "__main__":
    sys.exit(main())
