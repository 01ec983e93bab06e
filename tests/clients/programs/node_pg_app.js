// A node-postgres (pg) application: the default Pool with interleaved clients, a pool whose
// statement_timeout option cancels a pg_sleep, parameterised queries (also "$1,$2" without
// spaces), a transaction with a savepoint rolled back to, pg-cursor in batches,
// pg-copy-streams COPY FROM STDIN (without the tenant column) and COPY TO STDOUT, a named
// prepared statement run on several pool clients, and a unique violation on its own row.
//
// Usage: node node_pg_app.js DSN   (modules come from tests/clients/node/node_modules)
'use strict';

const path = require('path');
const { createRequire } = require('module');
const { pipeline } = require('stream/promises');
const { Readable, Writable } = require('stream');

const nodeRequire = createRequire(path.join(__dirname, '..', 'node', 'package.json'));
const { Pool } = nodeRequire('pg');
const Cursor = nodeRequire('pg-cursor');
const copyStreams = nodeRequire('pg-copy-streams');

const LO = 973000;

function say(...a) {
  console.log(a.map((x) => (typeof x === 'string' ? x : JSON.stringify(x))).join(' '));
}

function rows(res) {
  return res.rows.map((r) => Object.values(r));
}

async function main(dsn) {
  const pool = new Pool({ connectionString: dsn, max: 3, options: '-c lock_timeout=1234' });
  try {
    // rows a failed earlier run may have left in this program's id range
    await pool.query('DELETE FROM orders WHERE order_id > $1 AND order_id < $2', [LO, LO + 1000]);
    await pool.query('DELETE FROM customers WHERE customer_id > $1 AND customer_id < $2', [LO, LO + 1000]);
    // several acquire/release rounds with two clients whose queries interleave
    for (let i = 0; i < 3; i++) {
      const a = await pool.connect();
      const b = await pool.connect();
      try {
        const [ra, rb] = await Promise.all([
          a.query('SELECT count(*)::int AS n FROM customers WHERE customer_id < 1000'),
          b.query('SELECT name FROM customers WHERE customer_id = $1', [1 + (i % 2)]),
        ]);
        say('pool', i, ra.rows[0].n, rb.rows[0].name);
        say('pool again', i, rows(await b.query('SELECT count(*)::int FROM orders')),
          rows(await a.query('SELECT status FROM orders WHERE order_id = $1', [1])));
      } finally {
        a.release();
        b.release();
      }
    }
    // a connection option (options=-c) holds on every client; a SET holds on its own client only
    const x = await pool.connect();
    const y = await pool.connect();
    try {
      await x.query("SET TimeZone = 'Asia/Tokyo'");
      const settings = "SELECT current_setting('lock_timeout') AS l, current_setting('TimeZone') AS z";
      say('settings', rows(await x.query(settings)), rows(await y.query(settings)));
      await x.query('RESET TimeZone');
      say('reset', rows(await x.query(settings)));
    } finally {
      x.release();
      y.release();
    }
    say('pool.query', rows(await pool.query('SELECT name FROM customers ORDER BY customer_id')));

    // parameters: spaced, unspaced, typed, and a shared table joined to a tenant table
    say('params', rows(await pool.query(
      'SELECT customer_id, name FROM customers WHERE customer_id IN ($1,$2) ORDER BY 1', [1, 2])));
    say('params unspaced', rows(await pool.query(
      'SELECT order_id FROM orders WHERE order_id IN ($1,$2,$1) AND status IN ($3,$4) ORDER BY 1',
      [1, 3, 'open', 'shipped'])));
    say('params typed', rows(await pool.query('SELECT $1::int + $2::int AS s, $3::text AS t', [40, 2, 'x'])));
    say('row mode array', (await pool.query({ text: 'SELECT customer_id, name FROM customers ORDER BY 1', rowMode: 'array' })).rows);
    const multi = await pool.query('SELECT count(*)::int AS n FROM customers; SELECT status FROM orders ORDER BY order_id');
    say('multi-statement', multi.map((r) => rows(r)));
    say('types', rows(await pool.query(
      "SELECT 9007199254740993::int8 AS b, 2.50::numeric AS n, $1::bytea AS raw, ARRAY[1,2] AS a, '{\"k\":[1]}'::jsonb AS j",
      [Buffer.from([0, 1, 255])])));
    say('dates', rows(await pool.query('SELECT order_id, created_at FROM orders WHERE created_at < $1 ORDER BY 1',
      [new Date('2024-02-01T00:00:00Z')])));
    say('big parameter', rows(await pool.query('SELECT length($1::text) AS n', ['x'.repeat(300000)])));
    say('join', rows(await pool.query(
      'SELECT o.order_id, p.name, i.quantity FROM orders o JOIN order_items i USING (order_id) ' +
      'JOIN products p ON p.product_id = i.product_id WHERE o.customer_id = $1 ORDER BY 1, 2', [1])));

    // inserts without the tenant column; a transaction with a savepoint rolled back to
    await pool.query('INSERT INTO customers (customer_id, name, email) VALUES ($1,$2,$3), ($4,$5,$6)',
      [LO + 1, 'pg one', 'one@pg.example', LO + 2, 'pg two', null]);
    const tx = await pool.connect();
    try {
      await tx.query('BEGIN');
      await tx.query('SET LOCAL statement_timeout = 60000');
      say('set local', rows(await tx.query('SHOW statement_timeout')));
      await tx.query('INSERT INTO orders (order_id, customer_id, status) VALUES ($1, $2, $3)', [LO + 1, LO + 1, 'open']);
      await tx.query('SAVEPOINT before_second');
      await tx.query('INSERT INTO orders (order_id, customer_id, status) VALUES ($1, $2, $3)', [LO + 2, LO + 2, 'open']);
      say('in savepoint', rows(await tx.query('SELECT order_id FROM orders WHERE order_id > $1 ORDER BY 1', [LO])));
      await tx.query('ROLLBACK TO SAVEPOINT before_second');
      await tx.query('UPDATE orders SET status = $1 WHERE order_id = $2', ['shipped', LO + 1]);
      await tx.query('RELEASE SAVEPOINT before_second');
      await tx.query('COMMIT');
    } finally {
      tx.release();
    }
    say('after tx', rows(await pool.query('SELECT order_id, status FROM orders WHERE order_id > $1 ORDER BY 1', [LO])));

    // pg-cursor reads in batches (a portal fetched in several Execute messages)
    const cc = await pool.connect();
    try {
      await cc.query('INSERT INTO customers (customer_id, name) SELECT $1::int + g, $2 || g FROM generate_series(3, 9) g',
        [LO, 'batch ']);
      const cursor = cc.query(new Cursor('SELECT customer_id, name FROM customers WHERE customer_id > $1 ORDER BY 1', [LO]));
      const batches = [];
      for (;;) {
        const batch = await cursor.read(3);
        if (batch.length === 0) break;
        batches.push(batch.map((r) => r.customer_id - LO));
      }
      await cursor.close();
      say('cursor batches', batches);
    } finally {
      cc.release();
    }

    // COPY FROM STDIN without the tenant column (PostgreSQL refuses it under RLS), COPY TO STDOUT
    const cp = await pool.connect();
    try {
      try {
        const sink = cp.query(copyStreams.from('COPY customers (customer_id, name, email) FROM STDIN'));
        await pipeline(Readable.from([`${LO + 20}\tcopied\tcopy@pg.example\n${LO + 21}\tcopied too\t\\N\n`]), sink);
        say('copy in ok', sink.rowCount);
      } catch (e) {
        say('copy in ERROR', e.code);
      }
      say('copy in rows', rows(await cp.query(
        'SELECT customer_id - $1::int, name, email FROM customers WHERE customer_id BETWEEN $2 AND $3 ORDER BY 1',
        [LO, LO + 20, LO + 21])));
      let text = '';
      const source = cp.query(copyStreams.to(
        `COPY (SELECT customer_id - ${LO}, name, email FROM customers WHERE customer_id > ${LO} AND customer_id < ${LO + 20} ORDER BY 1) TO STDOUT`));
      await pipeline(source, new Writable({
        write(chunk, _enc, cb) { text += chunk.toString(); cb(); },
      }));
      say('copy out', text.split('\n').filter(Boolean));
      let whole = '';
      await pipeline(cp.query(copyStreams.to('COPY orders (order_id, customer_id, status) TO STDOUT WITH (FORMAT csv)')),
        new Writable({ write(chunk, _enc, cb) { whole += chunk.toString(); cb(); } }));
      say('copy out table', whole.split('\n').filter(Boolean).sort());
    } finally {
      cp.release();
    }

    // a named prepared statement, run several times on different pool clients
    const named = { name: 'customer_by_id', text: 'SELECT name FROM customers WHERE customer_id = $1' };
    const holders = [await pool.connect(), await pool.connect(), await pool.connect()];
    try {
      const got = [];
      for (const [k, c] of holders.entries()) {
        for (const id of [1, 2, LO + 1]) {
          const r = await c.query({ ...named, values: [id] });
          got.push(`${k}:${r.rows.map((x) => x.name).join('')}`);
        }
      }
      say('named', got);
    } finally {
      holders.forEach((c) => c.release());
    }
    say('named again', rows(await pool.query({ ...named, values: [2] })));

    // an error on its own row (unique violation), then the same client goes on
    const ec = await pool.connect();
    try {
      try {
        await ec.query('INSERT INTO customers (customer_id, name) VALUES ($1, $2)', [LO + 1, 'duplicate']);
        say('duplicate inserted?!');
      } catch (e) {
        say('unique violation', e.code, e.constraint, e.detail || '(no key detail under row-level security)');
      }
      try {
        await ec.query('BEGIN');
        await ec.query('UPDATE customers SET name = $1 WHERE customer_id = $2', ['x', LO + 2]);
        await ec.query('SELECT 1/0');
      } catch (e) {
        say('in tx error', e.code);
        try {
          await ec.query('SELECT 1');
        } catch (e2) {
          say('aborted', e2.code);
        }
        await ec.query('ROLLBACK');
      }
      say('recovered', rows(await ec.query('SELECT name FROM customers WHERE customer_id = $1', [LO + 2])));
    } finally {
      ec.release();
    }

    // clean up: the rows this program made, newest first (foreign keys)
    await pool.query('DELETE FROM orders WHERE order_id > $1 AND order_id < $2', [LO, LO + 1000]);
    const del = await pool.query('DELETE FROM customers WHERE customer_id > $1 AND customer_id < $2', [LO, LO + 1000]);
    say('deleted', del.rowCount > 0);
  } finally {
    await pool.end();
  }

  // results in binary format (the binary option), and a plain Client rather than a Pool
  const { Client } = nodeRequire('pg');
  const binary = new Client({ connectionString: dsn, binary: true });
  await binary.connect();
  try {
    say('binary', rows(await binary.query(
      'SELECT customer_id, name, 2.5::float8 AS f, true AS b FROM customers WHERE customer_id = ANY($1::int[]) ORDER BY 1',
      [[1, 2]])));
  } finally {
    await binary.end();
  }

  // the pool's statement_timeout option (a startup setting) cancels a long pg_sleep with 57014
  const slow = new Pool({ connectionString: dsn, statement_timeout: 300, application_name: 'node_pg_app', max: 1 });
  try {
    try {
      await slow.query('SELECT pg_sleep(30)');
      say('statement_timeout did not fire');
    } catch (e) {
      say('statement_timeout', e.code);
    }
    say('after timeout', rows(await slow.query("SELECT current_setting('statement_timeout') AS t, current_setting('application_name') AS a")));
  } finally {
    await slow.end();
  }
  say('done');
}

main(process.argv[2]).catch((e) => {
  console.error(e);
  process.exit(1);
});
