#!/usr/bin/env node
// Publishes apnsd jobs from Node with amqplib: a one-token job (--token) or
// fan-out jobs of up to 1,000 tokens (--tokens-file, one token per line).
//
// Each job is a persistent message, published with `mandatory` on a confirm
// channel: this returns only once RabbitMQ has the job on disk, and fails if
// the queue does not exist (apnsd declares it when it starts).
//
//   node publish.js --token 1b14a8... --alert Hello
//   node publish.js --tokens-file tokens.txt --alert "Sale ends tonight"
'use strict';

const amqp = require('amqplib');
const crypto = require('node:crypto');
const fs = require('node:fs');
const { parseArgs } = require('node:util');

const FAN_OUT = 1000; // tokens per job

async function main() {
  const { values: args } = parseArgs({
    options: {
      uri: { type: 'string', default: 'amqp://guest:guest@127.0.0.1:5672/%2f' },
      queue: { type: 'string', default: 'apns.jobs' },
      token: { type: 'string' },
      'tokens-file': { type: 'string' },
      alert: { type: 'string' },
      app: { type: 'string' },
    },
  });
  if (!args.alert || !args.token === !args['tokens-file']) {
    throw new Error('usage: publish.js (--token HEX | --tokens-file FILE) --alert TEXT [--app NAME]');
  }
  const tokens = args.token
    ? [args.token]
    : fs.readFileSync(args['tokens-file'], 'utf8').split('\n')
      .map((line) => line.trim())
      .filter((line) => line && !line.startsWith('#'));

  const connection = await amqp.connect(args.uri);
  try {
    const channel = await connection.createConfirmChannel();
    // A mandatory message that no queue takes comes back here before its confirm.
    let returned = null;
    channel.on('return', (message) => { returned = message.fields.replyText; });
    for (let start = 0; start < tokens.length; start += FAN_OUT) {
      const chunk = tokens.slice(start, start + FAN_OUT);
      const job = { id: crypto.randomUUID(), payload: { aps: { alert: args.alert, sound: 'default' } } };
      if (args.app) job.app = args.app;
      if (chunk.length === 1) job.token = chunk[0]; else job.tokens = chunk;
      channel.publish('', args.queue, Buffer.from(JSON.stringify(job)), {
        persistent: true,
        mandatory: true,
        contentType: 'application/json',
        messageId: job.id,
      });
      await channel.waitForConfirms(); // rejects if the broker nacked it
      if (returned) throw new Error(`not published: ${returned} (is apnsd running, or is the queue declared?)`);
      console.log(`published ${job.id} (${chunk.length} token(s))`);
    }
  } finally {
    await connection.close();
  }
}

main().catch((error) => {
  console.error(error.message);
  process.exit(1);
});
