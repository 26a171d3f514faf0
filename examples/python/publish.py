#!/usr/bin/env python3
"""Publishes apnsd jobs from Python with pika: a one-token job (--token) or
fan-out jobs of up to 1,000 tokens (--tokens-file, one token per line).

Each job is a persistent message, published with `mandatory` under publisher
confirms: this returns only once RabbitMQ has the job on disk, and fails if
the queue does not exist (apnsd declares it when it starts).

    python3 publish.py --token 1b14a8... --alert Hello
    python3 publish.py --tokens-file tokens.txt --alert "Sale ends tonight"
"""

import argparse
import json
import sys
import uuid

import pika

FAN_OUT = 1000  # tokens per job: one job stays well below the broker's frame limits


def read_tokens(path):
    with open(path, encoding="utf-8") as f:
        lines = (line.strip() for line in f)
        return [line for line in lines if line and not line.startswith("#")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uri", default="amqp://guest:guest@127.0.0.1:5672/%2f")
    parser.add_argument("--queue", default="apns.jobs")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--token", help="one device token (hex)")
    target.add_argument("--tokens-file", help="one token per line: fan-out jobs")
    parser.add_argument("--alert", required=True)
    parser.add_argument("--app", help="an [[apps]] name; the first app when absent")
    args = parser.parse_args()

    tokens = [args.token] if args.token else read_tokens(args.tokens_file)
    payload = {"aps": {"alert": args.alert, "sound": "default"}}
    connection = pika.BlockingConnection(pika.URLParameters(args.uri))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for start in range(0, len(tokens), FAN_OUT):
            chunk = tokens[start:start + FAN_OUT]
            job = {"id": str(uuid.uuid4()), "payload": payload}
            if args.app:
                job["app"] = args.app
            if len(chunk) == 1:
                job["token"] = chunk[0]
            else:
                job["tokens"] = chunk
            # Raises UnroutableError (no such queue) or NackError (not stored).
            channel.basic_publish(
                exchange="",
                routing_key=args.queue,
                body=json.dumps(job).encode(),
                properties=pika.BasicProperties(
                    content_type="application/json",
                    delivery_mode=2,  # persistent
                    message_id=job["id"],
                ),
                mandatory=True,
            )
            print(f"published {job['id']} ({len(chunk)} token(s))")
    except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as e:
        sys.exit(f"not published: {e!r} (is apnsd running, or is the queue declared?)")
    finally:
        connection.close()


if __name__ == "__main__":
    main()
