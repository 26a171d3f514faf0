<?php
// Publishes apnsd jobs from PHP with php-amqplib (Debian: apt install
// php-cli php-amqplib; Composer: php-amqplib/php-amqplib): a one-token job
// (--token) or fan-out jobs of up to 1,000 tokens (--tokens-file).
//
// Each job is a persistent message, published with `mandatory` under
// publisher confirms: this returns only once RabbitMQ has the job on disk, and
// fails if the queue does not exist (apnsd declares it when it starts).
//
//   php publish.php --token 1b14a8... --alert Hello
//   php publish.php --tokens-file tokens.txt --alert "Sale ends tonight"

declare(strict_types=1);

require_once stream_resolve_include_path('PhpAmqpLib/autoload.php') ?: __DIR__ . '/vendor/autoload.php';

use PhpAmqpLib\Connection\AMQPStreamConnection;
use PhpAmqpLib\Message\AMQPMessage;

const FAN_OUT = 1000; // tokens per job

function fail(string $why): never
{
    fwrite(STDERR, $why . "\n");
    exit(1);
}

/** amqp://user:password@host:port/vhost, as the other clients take it. */
function connect(string $uri): AMQPStreamConnection
{
    $u = parse_url($uri);
    if ($u === false || ($u['scheme'] ?? '') !== 'amqp') {
        fail('--uri must be amqp://user:password@host:port/vhost');
    }
    $vhost = isset($u['path']) && $u['path'] !== '/' ? rawurldecode(substr($u['path'], 1)) : '/';
    return new AMQPStreamConnection(
        $u['host'] ?? '127.0.0.1',
        $u['port'] ?? 5672,
        rawurldecode($u['user'] ?? 'guest'),
        rawurldecode($u['pass'] ?? 'guest'),
        $vhost,
    );
}

$args = getopt('', ['uri:', 'queue:', 'token:', 'tokens-file:', 'alert:', 'app:']);
$uri = $args['uri'] ?? 'amqp://guest:guest@127.0.0.1:5672/%2f';
$queue = $args['queue'] ?? 'apns.jobs';
if (!isset($args['alert']) || isset($args['token']) === isset($args['tokens-file'])) {
    fail('usage: publish.php (--token HEX | --tokens-file FILE) --alert TEXT [--app NAME]');
}
if (isset($args['token'])) {
    $tokens = [$args['token']];
} else {
    $lines = file($args['tokens-file'], FILE_IGNORE_NEW_LINES) ?: fail("cannot read {$args['tokens-file']}");
    $tokens = array_values(array_filter(array_map('trim', $lines), fn ($l) => $l !== '' && $l[0] !== '#'));
}

$connection = connect($uri);
$channel = $connection->channel();
$channel->confirm_select();
$problem = null;
$channel->set_nack_handler(function () use (&$problem) { $problem = 'the broker did not store the job'; });
$channel->set_return_listener(function ($replyCode, $replyText) use (&$problem) {
    $problem = "$replyText (is apnsd running, or is the queue declared?)";
});

foreach (array_chunk($tokens, FAN_OUT) as $chunk) {
    $id = bin2hex(random_bytes(16));
    $job = ['id' => $id, 'payload' => ['aps' => ['alert' => $args['alert'], 'sound' => 'default']]];
    if (isset($args['app'])) {
        $job['app'] = $args['app'];
    }
    if (count($chunk) === 1) {
        $job['token'] = $chunk[0];
    } else {
        $job['tokens'] = $chunk;
    }
    $message = new AMQPMessage(json_encode($job, JSON_THROW_ON_ERROR), [
        'content_type' => 'application/json',
        'delivery_mode' => AMQPMessage::DELIVERY_MODE_PERSISTENT,
        'message_id' => $id,
    ]);
    $channel->basic_publish($message, '', $queue, true);
    $channel->wait_for_pending_acks_returns(30);
    if ($problem !== null) {
        fail("not published: $problem");
    }
    echo "published $id (" . count($chunk) . " token(s))\n";
}

$channel->close();
$connection->close();
