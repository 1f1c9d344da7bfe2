"""A local S3-compatible server (moto) for the tests, the benches and trying the S3 lake on one machine.

No MinIO server is installable from the registries reachable here; moto's server speaks the S3 API
that boto3, s3fs and pyarrow use (conditional writes included). It keeps its objects in memory: a
stand-in for a team's object store, never a place for data that matters.

    with LocalS3(port=9000) as s3:          # `python -m evoforge.data.local_s3 --port 9000` from a shell
        s3.create_bucket("lake")
        os.environ.update(s3.environment())  # AWS_ENDPOINT_URL and test credentials
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from evoforge.data import home

# moto accepts any credentials; these make boto3, s3fs and pyarrow sign requests without ~/.aws
TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "evoforge-test", "AWS_SECRET_ACCESS_KEY": "evoforge-test",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalS3:
    """`moto_server` in a child process of its own session, stopped on exit."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", log_path: Path | None = None):
        self.host, self.port = host, port or free_port()
        self.url = f"http://{host}:{self.port}"
        self.log_path = log_path or home.home() / "logs" / "local-s3" / f"moto-{self.port}.log"
        self.process: subprocess.Popen | None = None

    def environment(self) -> dict[str, str]:
        return {**TEST_CREDENTIALS, "AWS_ENDPOINT_URL": self.url}

    def start(self, wait_seconds: float = 60) -> "LocalS3":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **self.environment()},
            )
        deadline = time.monotonic() + wait_seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the local S3 server exited with status {self.process.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1):
                    return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the local S3 server did not answer on {self.url} within {wait_seconds:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def client(self):
        import boto3

        env = self.environment()
        return boto3.client("s3", endpoint_url=self.url, region_name=env["AWS_DEFAULT_REGION"],
                            aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def __enter__(self) -> "LocalS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    home.configure()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--bucket", action="append", default=[], help="create this bucket (repeatable)")
    args = parser.parse_args()
    with LocalS3(args.port, args.host) as s3:
        for bucket in args.bucket:
            s3.create_bucket(bucket)
        print(f"local S3 on {s3.url}; set:\n" + "\n".join(f"  export {k}={v}" for k, v in s3.environment().items()),
              flush=True)
        try:
            s3.process.wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
