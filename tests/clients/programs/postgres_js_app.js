// A Postgres.js (porsager/postgres) application: its helpers (sql(array) for IN lists,
// sql(object) and sql(rows) inserts, dynamic columns and an update from an object),
// sql.begin with a savepoint rolled back, a cursor, sql.unsafe, prepared statements (its
// default) and one client with prepare: false, and a unique violation on its own row.
//
// Usage: node postgres_js_app.js DSN   (modules come from tests/clients/node/node_modules)
'use strict';

const path = require('path');
const { createRequire } = require('module');
const { pathToFileURL } = require('url');
const { pipeline } = require('stream/promises');
const { Readable, Writable } = require('stream');

const nodeRequire = createRequire(path.join(__dirname, '..', 'node', 'package.json'));

const LO = 974000;

function say(...a) {
  console.log(a.map((x) => (typeof x === 'string' ? x : JSON.stringify(x))).join(' '));
}

function vals(result) {
  return result.map((r) => Object.values(r));
}

async function main(dsn) {
  // postgres is an ES module; load it from the suite's node_modules
  const { default: postgres } = await import(pathToFileURL(nodeRequire.resolve('postgres')).href);
  const sql = postgres(dsn, { max: 3, onnotice: () => {} });
  try {
    // rows a failed earlier run may have left in this program's id range
    await sql`DELETE FROM orders WHERE order_id > ${LO} AND order_id < ${LO + 1000}`;
    await sql`DELETE FROM customers WHERE customer_id > ${LO} AND customer_id < ${LO + 1000}`;
    say('names', vals(await sql`SELECT name FROM customers ORDER BY customer_id`));
    const id = 2;
    say('param', vals(await sql`SELECT customer_id, name FROM customers WHERE customer_id = ${id}`));

    // sql(array) for an IN list; dynamic columns; the shared table joined in
    say('in list', vals(await sql`SELECT order_id, status FROM orders WHERE order_id IN ${sql([1, 3])} ORDER BY 1`));
    const columns = ['customer_id', 'name'];
    say('dynamic columns', vals(await sql`SELECT ${sql(columns)} FROM customers ORDER BY ${sql(columns[0])}`));
    say('join', vals(await sql`
      SELECT o.order_id, p.name, i.quantity
        FROM orders o JOIN order_items i USING (order_id) JOIN products p ON p.product_id = i.product_id
       WHERE o.customer_id = ${1} ORDER BY 1, 2`));

    // other query forms: a nested fragment, .values(), .describe(), .simple(), forEach, json
    const openOnly = sql`AND status = ${'open'}`;
    say('fragment', vals(await sql`SELECT order_id FROM orders WHERE customer_id = ${1} ${openOnly} ORDER BY 1`));
    say('values()', await sql`SELECT customer_id, name FROM customers ORDER BY 1`.values());
    const described = await sql`SELECT name, customer_id FROM customers WHERE customer_id = ${1}`.describe();
    say('describe', described.types, described.columns.map((c) => [c.name, c.type]));
    say('simple()', (await sql`SELECT count(*)::int FROM customers; SELECT count(*)::int FROM orders`.simple()).map(vals));
    const each = [];
    await sql`SELECT customer_id FROM customers ORDER BY 1`.forEach((r) => { each.push(r.customer_id); });
    say('forEach', each);
    say('json', vals(await sql`SELECT ${sql.json({ a: 1, b: [1, 2] })}::jsonb -> 'b' AS j`));
    say('types', vals(await sql`SELECT 9007199254740993::int8 AS b, 2.50::numeric AS n, true AS t, NULL::int AS z`));
    say('dates', vals(await sql`SELECT order_id, created_at FROM orders WHERE created_at < ${new Date('2024-02-01T00:00:00Z')} ORDER BY 1`));

    // sql(object) and sql(rows): inserts without the tenant column
    await sql`INSERT INTO customers ${sql({ customer_id: LO + 1, name: 'pjs one', email: 'one@pjs.example' })}`;
    const many = [2, 3, 4].map((k) => ({ customer_id: LO + k, name: `pjs ${k}`, email: null }));
    const inserted = await sql`INSERT INTO customers ${sql(many, 'customer_id', 'name', 'email')} RETURNING customer_id`;
    say('multi-row insert', inserted.count, inserted.map((r) => r.customer_id - LO));
    await sql`UPDATE customers SET ${sql({ email: 'four@pjs.example' }, 'email')} WHERE customer_id = ${LO + 4}`;
    say('update from object', vals(await sql`SELECT email FROM customers WHERE customer_id = ${LO + 4}`));

    // sql.begin with a savepoint that is rolled back (its callback throws)
    const outcome = await sql.begin(async (tx) => {
      await tx`INSERT INTO orders ${tx({ order_id: LO + 1, customer_id: LO + 1, status: 'open' })}`;
      try {
        await tx.savepoint(async (sp) => {
          await sp`INSERT INTO orders ${sp({ order_id: LO + 2, customer_id: LO + 2, status: 'open' })}`;
          say('in savepoint', vals(await sp`SELECT order_id FROM orders WHERE order_id > ${LO} ORDER BY 1`));
          throw new Error('undo the savepoint');
        });
      } catch (e) {
        say('savepoint rolled back:', e.message);
      }
      await tx`UPDATE orders SET status = 'shipped' WHERE order_id = ${LO + 1}`;
      return vals(await tx`SELECT order_id, status FROM orders WHERE order_id > ${LO} ORDER BY 1`);
    });
    say('begin result', outcome);
    say('after begin', vals(await sql`SELECT order_id, status FROM orders WHERE order_id > ${LO} ORDER BY 1`));

    // an update from a VALUES list built by sql(rows)
    const renamed = await sql`
      UPDATE customers SET name = v.name FROM (VALUES ${sql([[LO + 2, 'pjs two'], [LO + 3, 'pjs three']])}) AS v (id, name)
       WHERE customers.customer_id = v.id::int RETURNING customers.customer_id, customers.name`;
    say('update from values', renamed.map((r) => [r.customer_id - LO, r.name]).sort());

    // a read-only transaction reads, and refuses a write
    say('begin read only', vals(await sql.begin('read only', (tx) => tx`SELECT count(*)::int AS n FROM orders`)));
    try {
      await sql.begin('read only', (tx) => tx`UPDATE orders SET status = status WHERE order_id = ${1}`);
    } catch (e) {
      say('read only write', e.code);
    }

    // a reserved connection keeps its session setting
    const reserved = await sql.reserve();
    try {
      await reserved`SET statement_timeout = 4321`;
      say('reserved', vals(await reserved`SHOW statement_timeout`));
    } finally {
      reserved.release();
    }

    // a failing sql.begin rolls everything back
    try {
      await sql.begin(async (tx) => {
        await tx`UPDATE customers SET name = 'never' WHERE customer_id = ${LO + 1}`;
        await tx`SELECT 1/0`;
      });
    } catch (e) {
      say('begin failed', e.code);
    }
    say('not committed', vals(await sql`SELECT name FROM customers WHERE customer_id = ${LO + 1}`));

    // a cursor reads in batches
    const batches = [];
    await sql`SELECT customer_id FROM customers WHERE customer_id > ${LO} OR customer_id < 1000 ORDER BY 1`
      .cursor(2, async (rows) => { batches.push(rows.map((r) => (r.customer_id > LO ? `LO+${r.customer_id - LO}` : r.customer_id))); });
    say('cursor batches', batches);
    const iterated = [];
    for await (const rows of sql`SELECT customer_id FROM customers WHERE customer_id < 1000 ORDER BY 1`.cursor(1)) {
      iterated.push(rows.map((r) => r.customer_id));
    }
    say('cursor iterator', iterated);

    // sql.unsafe: a text query with parameters, and one without (simple protocol)
    say('unsafe', vals(await sql.unsafe('SELECT name FROM customers WHERE customer_id IN ($1,$2) ORDER BY 1', [1, LO + 1])));
    say('unsafe simple', vals(await sql.unsafe('SELECT count(*)::int AS n FROM orders')));

    // prepared statements (the default): the same query text many times, also concurrently
    const runs = await Promise.all([1, 2, 1, 2, LO + 2, LO + 3].map(
      (k) => sql`SELECT name FROM customers WHERE customer_id = ${k}`));
    say('prepared', runs.map((r) => r.map((x) => x.name).join('')));

    // a unique violation on its own row, then the pool goes on
    try {
      await sql`INSERT INTO customers ${sql({ customer_id: LO + 1, name: 'duplicate' })}`;
      say('duplicate inserted?!');
    } catch (e) {
      say('unique violation', e.code, e.constraint_name);
    }
    // COPY through streams: .writable() without the tenant column (PostgreSQL refuses COPY FROM
    // under RLS; tenantgate takes it), .readable() of a query
    try {
      const sink = await sql`COPY customers (customer_id, name) FROM STDIN`.writable();
      await pipeline(Readable.from([`${LO + 500}\tcopied\n${LO + 501}\tcopied too\n`]), sink);
      say('copy in ok', vals(await sql`SELECT customer_id - ${LO}, name FROM customers WHERE customer_id >= ${LO + 500} ORDER BY 1`));
    } catch (e) {
      say('copy in ERROR', e.code);
    }
    await sql`DELETE FROM customers WHERE customer_id >= ${LO + 500}`;
    let copied = '';
    const source = await sql`COPY (SELECT customer_id, name FROM customers WHERE customer_id < 974500 ORDER BY 1) TO STDOUT`.readable(); // LO + 500 (COPY takes no parameters)
    await pipeline(source, new Writable({ write(chunk, _enc, cb) { copied += chunk; cb(); } }));
    say('copy out', copied.split('\n').filter(Boolean));

    // LISTEN: tenantgate refuses it (channels are shared by all tenants; docs/limitations.md)
    try {
      const listener = await sql.listen('pjs_channel', () => {});
      await listener.unlisten();
      say('listen ok');
    } catch (e) {
      say('listen ERROR', e.code);
    }
    say('after error', vals(await sql`SELECT count(*)::int AS n FROM customers WHERE customer_id > ${LO}`));
  } finally {
    await sql.end();
  }

  // one connection, many queries in flight (Postgres.js pipelines them), one of them failing;
  // column names transformed to camelCase, without fetching array types at connect
  const piped = postgres(dsn, { max: 1, transform: postgres.camel, fetch_types: false, onnotice: () => {} });
  try {
    const queries = [];
    for (let k = 0; k < 40; k++) queries.push(piped`SELECT name FROM customers WHERE customer_id = ${1 + (k % 2)}`);
    say('pipelined', (await Promise.all(queries)).map((r) => r[0].name.split(' ')[0]).join(','));
    const settled = await Promise.allSettled([piped`SELECT 1 AS a`, piped`SELECT 1/0 AS b`,
      piped`SELECT customer_id, order_id FROM orders WHERE order_id = ${3}`]);
    say('pipelined with error', settled.map((x) => (x.status === 'fulfilled' ? x.value : x.reason.code)));
  } finally {
    await piped.end();
  }

  // a running query canceled (a CancelRequest on its own connection); cancel again until it
  // ends, since a cancel that arrives before the query starts is ignored by PostgreSQL
  const canceling = postgres(dsn, { max: 1, onnotice: () => {} });
  try {
    const slow = canceling`SELECT pg_sleep(60)`;
    const timer = setInterval(() => slow.cancel(), 250);
    try {
      await slow;
      say('cancel did not work');
    } catch (e) {
      say('canceled', e.code);
    } finally {
      clearInterval(timer);
    }
  } finally {
    await canceling.end();
  }

  // the same kind of work with prepare: false (unnamed statements, as behind a transaction pooler)
  const unprepared = postgres(dsn, { prepare: false, max: 2, onnotice: () => {} });
  try {
    say('unprepared', vals(await unprepared`SELECT name FROM customers WHERE customer_id IN ${unprepared([2, LO + 4])} ORDER BY 1`));
    await unprepared`DELETE FROM orders WHERE order_id > ${LO} AND order_id < ${LO + 1000}`;
    const deleted = await unprepared`DELETE FROM customers WHERE customer_id > ${LO} AND customer_id < ${LO + 1000}`;
    say('deleted', deleted.count);
  } finally {
    await unprepared.end();
  }
  say('done');
}

main(process.argv[2]).catch((e) => {
  console.error(e);
  process.exit(1);
});
