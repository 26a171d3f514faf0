#!/usr/bin/env python3
"""Removes dead device tokens from an application's SQLite table as apnsd
reports them: `unregistered`, `failed.unregistered`, `failed.bad_device_token`
and `failed.invalid_token` results delete the token; other failures
(`failed.expired`, `failed.gateway_unreachable`, ...) are not the token's
fault and are only printed.

It consumes a durable queue bound to the results exchange with `failed.#` and
`unregistered` (declared here if absent; see deploy/rabbitmq-definitions.json)
and acknowledges each result only after the database commit: a crash between
the two redelivers the result, and deleting a token twice is harmless.

    python3 prune_tokens.py --db app.sqlite3           # runs until interrupted
    python3 prune_tokens.py --db app.sqlite3 --drain   # stops when the queue is empty
"""

import argparse
import json
import sqlite3

import pika

DEAD = {"unregistered", "failed.unregistered", "failed.bad_device_token", "failed.invalid_token"}


def open_db(path):
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE IF NOT EXISTS device_tokens ("
        " token TEXT PRIMARY KEY,"  # lower-case hex, as apnsd reports it
        " user_id TEXT)"
    )
    db.commit()
    return db


def handle(db, channel, method, body):
    """Deletes the token if the result says it is dead, commits, then acks."""
    result = json.loads(body)
    if method.routing_key in DEAD:
        with db:  # commits, or rolls back and raises (the result stays unacked)
            gone = db.execute(
                "DELETE FROM device_tokens WHERE token = ?", (result["token"],)
            ).rowcount
        print(f"{method.routing_key}: {result['token']} ({gone} row(s) deleted)")
    else:
        print(f"{method.routing_key}: {result.get('token')} kept ({result.get('reason')})")
    channel.basic_ack(method.delivery_tag)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uri", default="amqp://guest:guest@127.0.0.1:5672/%2f")
    parser.add_argument("--db", required=True, help="SQLite file with the device_tokens table")
    parser.add_argument("--exchange", default="apns.results", help="apnsd's results_exchange")
    parser.add_argument("--queue", default="apns.results.failed")
    parser.add_argument("--drain", action="store_true", help="exit once the queue is empty")
    args = parser.parse_args()

    db = open_db(args.db)
    connection = pika.BlockingConnection(pika.URLParameters(args.uri))
    channel = connection.channel()
    channel.exchange_declare(args.exchange, exchange_type="topic", durable=True)
    channel.queue_declare(args.queue, durable=True)
    for key in ("failed.#", "unregistered"):
        channel.queue_bind(args.queue, args.exchange, routing_key=key)
    try:
        if args.drain:
            while True:
                method, _, body = channel.basic_get(args.queue)
                if method is None:
                    break
                handle(db, channel, method, body)
        else:
            channel.basic_qos(prefetch_count=100)
            for method, _, body in channel.consume(args.queue):
                handle(db, channel, method, body)
    except KeyboardInterrupt:
        pass
    finally:
        connection.close()
        db.close()


if __name__ == "__main__":
    main()
