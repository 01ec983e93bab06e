// A Java (pgjdbc) application: server-side prepared statements with IN lists, batches with
// and without reWriteBatchedInserts, query timeouts and cancellation from another thread,
// DatabaseMetaData on the tenant tables, the SQL Hibernate 6 sends, transactions with
// savepoints, read-only and serializable transactions, fetch sizes, the simple query mode,
// CopyManager, updatable result sets, and what a tenant may not do (large objects, LISTEN,
// currentSchema).  Prints a deterministic transcript.
//
// Run without a build step (single-file source launch):
//   java -cp /usr/share/java/postgresql.jar JdbcApp.java <jdbc-url> <user> <password> <schema>
// It stays one file (about 600 lines) because Java 17's source launcher runs exactly one file.
// <schema> is where the tables live for this connection (metadata calls need it: the direct
// run's tables are in schema "direct", tenantgate's in "public"); it is never printed.

import java.io.StringReader;
import java.io.StringWriter;
import java.math.BigDecimal;
import java.sql.BatchUpdateException;
import java.sql.Connection;
import java.sql.DatabaseMetaData;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.ResultSetMetaData;
import java.sql.SQLException;
import java.sql.Savepoint;
import java.sql.Statement;
import java.time.OffsetDateTime;
import java.time.ZoneOffset;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Collections;
import java.util.HexFormat;
import java.util.List;
import java.util.Properties;
import java.util.UUID;
import java.util.concurrent.atomic.AtomicBoolean;

import org.postgresql.PGConnection;
import org.postgresql.PGStatement;
import org.postgresql.copy.CopyManager;

public class JdbcApp {
    static final int LO = 975000; // this program's private id range (the lower half); removed at the end

    static String url;
    static Properties props = new Properties();

    static void say(Object... parts) {
        StringBuilder b = new StringBuilder();
        for (Object p : parts) {
            if (b.length() > 0) b.append(' ');
            b.append(p);
        }
        System.out.println(b);
        System.out.flush();
    }

    static Connection connect(String extra) throws SQLException {
        String u = url;
        if (extra != null) u += (url.contains("?") ? "&" : "?") + extra;
        return DriverManager.getConnection(u, props);
    }

    /** Every row of rs as a list of its values (in column order). */
    static List<String> rows(ResultSet rs, String... columns) throws SQLException {
        List<String> out = new ArrayList<>();
        ResultSetMetaData md = rs.getMetaData();
        while (rs.next()) {
            List<String> row = new ArrayList<>();
            if (columns.length == 0) {
                for (int i = 1; i <= md.getColumnCount(); i++) row.add(text(rs.getObject(i)));
            } else {
                for (String c : columns) row.add(text(rs.getObject(c)));
            }
            out.add(String.join("|", row));
        }
        rs.close();
        return out;
    }

    static String text(Object v) {
        return v instanceof byte[] ? "\\x" + HexFormat.of().formatHex((byte[]) v) : String.valueOf(v);
    }

    static List<String> sorted(List<String> l) {
        Collections.sort(l);
        return l;
    }

    static List<String> query(Connection c, String sql, Object... params) throws SQLException {
        try (PreparedStatement ps = c.prepareStatement(sql)) {
            for (int i = 0; i < params.length; i++) ps.setObject(i + 1, params[i]);
            return rows(ps.executeQuery());
        }
    }

    public static void main(String[] args) throws Exception {
        url = args[0];
        props.setProperty("user", args[1]);
        props.setProperty("password", args[2]);
        String schema = args[3];

        try (Connection c = connect(null)) {
            DatabaseMetaData md = c.getMetaData();
            say("driver", md.getDriverName(), md.getDriverVersion());
            say("seed", query(c, "SELECT customer_id, name FROM customers WHERE customer_id < 1000 ORDER BY 1"));

            serverPrepared(c);
            batches(c);
            timeoutAndCancel(c);
            metadata(md, schema);
            hibernate(c);
            transaction(c);
            sessionFeatures(c);
            queryModes();
            types(c);
            copy(c);
            updatableResultSet(c);
            refusals(c, schema);

            try (PreparedStatement ps = c.prepareStatement("DELETE FROM customers WHERE customer_id BETWEEN ? AND ?")) {
                ps.setInt(1, LO);
                ps.setInt(2, LO + 499); // JdbcPoolingApp.java uses the upper half
                say("cleanup", ps.executeUpdate());
            }
        }
        say("done");
    }

    /** A PreparedStatement run more often than prepareThreshold (5) becomes a named server-side
     *  statement; ?,? without spaces becomes $1,$2. */
    static void serverPrepared(Connection c) throws SQLException {
        try (PreparedStatement ps = c.prepareStatement(
                "SELECT customer_id, name FROM customers WHERE customer_id IN (?,?) ORDER BY customer_id")) {
            say("prepareThreshold", ps.unwrap(PGStatement.class).getPrepareThreshold());
            for (int i = 0; i < 8; i++) {
                ps.setInt(1, 1 + (i % 2));
                ps.setInt(2, 2 + (i % 3));
                say("prepared", i, rows(ps.executeQuery()));
            }
            say("server prepared", ps.unwrap(PGStatement.class).isUseServerPrepare());
        }
        try (PreparedStatement ps = c.prepareStatement(
                "SELECT o.order_id, o.status FROM orders o WHERE o.order_id IN (?,?,?) AND o.status IN (?,?) "
                        + "ORDER BY o.order_id")) {
            for (int i = 0; i < 7; i++) {
                ps.setInt(1, 1);
                ps.setInt(2, 2);
                ps.setInt(3, 3);
                ps.setString(4, "open");
                ps.setString(5, i % 2 == 0 ? "shipped" : "cancelled");
                say("orders in", i, rows(ps.executeQuery()));
            }
        }
    }

    /** executeBatch, once as separate Bind/Execute messages, once rewritten by the driver into one
     *  multi-row INSERT (reWriteBatchedInserts=true, on a second connection). */
    static void batches(Connection c) throws SQLException {
        String insert = "INSERT INTO customers (customer_id, name, email) VALUES (?, ?, ?)";
        try (PreparedStatement ps = c.prepareStatement(insert)) {
            for (int i = 1; i <= 3; i++) {
                ps.setInt(1, LO + i);
                ps.setString(2, "batch " + i);
                ps.setString(3, i == 2 ? null : "b" + i + "@x");
                ps.addBatch();
            }
            say("batch", Arrays.toString(ps.executeBatch()));
        }
        try (Connection r = connect("reWriteBatchedInserts=true");
             PreparedStatement ps = r.prepareStatement(insert)) {
            for (int i = 11; i <= 14; i++) {
                ps.setInt(1, LO + i);
                ps.setString(2, "rewritten " + i);
                ps.setString(3, "r" + i + "@x");
                ps.addBatch();
            }
            say("rewritten batch", Arrays.toString(ps.executeBatch()));
            // a batch that fails part way: a duplicate key in the second row
            for (int i : new int[] {20, 1, 21}) {
                ps.setInt(1, LO + i);
                ps.setString(2, "dup " + i);
                ps.setString(3, null);
                ps.addBatch();
            }
            try {
                ps.executeBatch();
                say("failing batch ran");
            } catch (BatchUpdateException e) {
                say("failing batch", e.getSQLState());
            }
        }
        say("after batches", query(c, "SELECT customer_id, name, email FROM customers WHERE customer_id > ? ORDER BY 1", LO));
    }

    /** setQueryTimeout and Statement.cancel() both send a CancelRequest on a new connection. */
    static void timeoutAndCancel(Connection c) throws Exception {
        try (Statement s = c.createStatement()) {
            s.setQueryTimeout(1);
            s.executeQuery("SELECT pg_sleep(3)");
            say("timeout: query finished");
        } catch (SQLException e) {
            say("timeout", e.getSQLState());
        }
        say("after timeout", query(c, "SELECT count(*) FROM customers WHERE customer_id < 1000"));

        try (Statement s = c.createStatement()) {
            AtomicBoolean finished = new AtomicBoolean(false);
            // cancel() does nothing until the statement is running, and a CancelRequest that
            // reaches the server before the query is lost: keep cancelling until it ends.
            Thread canceller = new Thread(() -> {
                while (!finished.get()) {
                    try {
                        Thread.sleep(200);
                        if (!finished.get()) s.cancel();
                    } catch (Exception e) {
                        return;
                    }
                }
            });
            canceller.start();
            try {
                s.executeQuery("SELECT pg_sleep(60)");
                say("cancel: query finished");
            } catch (SQLException e) {
                say("cancel", e.getSQLState());
            } finally {
                finished.set(true);
                canceller.join();
            }
        }
        say("after cancel", query(c, "SELECT count(*) FROM orders WHERE order_id < 1000"));
    }

    /** DatabaseMetaData on the tenant tables, stable columns only (no schema names, no oids). */
    static void metadata(DatabaseMetaData md, String schema) throws SQLException {
        List<String> tables = new ArrayList<>();
        for (String t : rows(md.getTables(null, schema, "%", new String[] {"TABLE"}), "TABLE_NAME", "TABLE_TYPE")) {
            tables.add(t);
        }
        say("tables", sorted(tables));
        // COLUMN_DEF of tenant_id is not printed: the direct target defaults it to its tenant,
        // where tenantgate fills it in
        List<String> columns = new ArrayList<>();
        try (ResultSet rs = md.getColumns(null, schema, "orders", "%")) {
            while (rs.next()) {
                String name = rs.getString("COLUMN_NAME");
                columns.add(rs.getInt("ORDINAL_POSITION") + "|" + name + "|" + rs.getString("TYPE_NAME") + "|"
                        + rs.getInt("DATA_TYPE") + "|" + rs.getInt("NULLABLE") + "|"
                        + (name.equals("tenant_id") ? "-" : rs.getString("COLUMN_DEF")));
            }
        }
        say("columns", columns);
        for (String t : new String[] {"customers", "orders", "order_items"}) {
            say("primary key", t, rows(md.getPrimaryKeys(null, schema, t), "COLUMN_NAME", "KEY_SEQ", "PK_NAME"));
        }
        for (String t : new String[] {"orders", "order_items"}) {
            say("imported keys", t, sorted(rows(md.getImportedKeys(null, schema, t),
                    "FK_NAME", "KEY_SEQ", "PKTABLE_NAME", "PKCOLUMN_NAME", "FKCOLUMN_NAME", "DELETE_RULE")));
        }
        say("exported keys", "customers", sorted(rows(md.getExportedKeys(null, schema, "customers"),
                "FK_NAME", "KEY_SEQ", "FKTABLE_NAME", "FKCOLUMN_NAME")));
        say("cross reference", sorted(rows(md.getCrossReference(null, schema, "customers", null, schema, "orders"),
                "FK_NAME", "KEY_SEQ", "PKCOLUMN_NAME", "FKCOLUMN_NAME")));
        say("best row identifier", sorted(rows(md.getBestRowIdentifier(null, schema, "customers",
                DatabaseMetaData.bestRowSession, true), "COLUMN_NAME", "TYPE_NAME")));
        say("functions", rows(md.getFunctions(null, "pg_catalog", "upper"), "FUNCTION_NAME"));
        // owner and grantees are roles tenantgate hides from pg_roles
        say("table privileges", sorted(rows(md.getTablePrivileges(null, schema, "customers"), "PRIVILEGE")));
        for (String t : new String[] {"customers", "order_items"}) {
            say("index info", t, sorted(rows(md.getIndexInfo(null, schema, t, false, false),
                    "INDEX_NAME", "NON_UNIQUE", "ORDINAL_POSITION", "COLUMN_NAME")));
        }
    }

    /** The statements Hibernate 6 generates for an entity Customer(customerId, name, email). */
    static void hibernate(Connection c) throws SQLException {
        try (PreparedStatement ps = c.prepareStatement("insert into customers (email,name,customer_id) values (?,?,?)")) {
            for (int i = 30; i <= 32; i++) {
                ps.setString(1, "h" + i + "@x");
                ps.setString(2, "hibernate " + i);
                ps.setInt(3, LO + i);
                ps.addBatch();
            }
            say("persist", Arrays.toString(ps.executeBatch()));
        }
        String find = "select c1_0.customer_id,c1_0.email,c1_0.name from customers c1_0 where c1_0.customer_id=?";
        say("find", query(c, find, LO + 30));
        try (PreparedStatement ps = c.prepareStatement("update customers set email=?,name=? where customer_id=?")) {
            ps.setString(1, "h30@y");
            ps.setString(2, "merged");
            ps.setInt(3, LO + 30);
            say("merge", ps.executeUpdate());
        }
        say("page 1", query(c, "select c1_0.customer_id,c1_0.name from customers c1_0 where c1_0.customer_id>=? "
                + "order by c1_0.customer_id offset ? rows fetch first ? rows only", LO + 30, 0, 2));
        say("page 2", query(c, "select c1_0.customer_id,c1_0.name from customers c1_0 where c1_0.customer_id>=? "
                + "order by c1_0.customer_id offset ? rows fetch first ? rows only", LO + 30, 2, 2));
        say("count", query(c, "select count(c1_0.customer_id) from customers c1_0 where c1_0.customer_id>?", LO));
        say("join fetch", query(c, "select o1_0.order_id,o1_0.status,c1_0.customer_id,c1_0.name from orders o1_0 "
                + "join customers c1_0 on c1_0.customer_id=o1_0.customer_id where o1_0.order_id<? order by o1_0.order_id", 1000));
        say("left join", query(c, "select c1_0.customer_id,o1_0.order_id from customers c1_0 left join orders o1_0 "
                + "on c1_0.customer_id=o1_0.customer_id where c1_0.customer_id<? order by 1,2", 1000));
        // getGeneratedKeys: the driver appends RETURNING "customer_id"
        try (PreparedStatement ps = c.prepareStatement("insert into customers (email,name,customer_id) values (?,?,?)",
                new String[] {"customer_id"})) {
            ps.setString(1, null);
            ps.setString(2, "returning");
            ps.setInt(3, LO + 40);
            ps.executeUpdate();
            say("generated keys", rows(ps.getGeneratedKeys()));
        }
        // Hibernate's upsert (merge of a detached entity) and pessimistic locks
        try (PreparedStatement ps = c.prepareStatement("insert into customers (email,name,customer_id) values (?,?,?) "
                + "on conflict (tenant_id,customer_id) do update set name=excluded.name,email=excluded.email")) {
            ps.setString(1, null);
            ps.setString(2, "upserted");
            ps.setInt(3, LO + 32);
            say("upsert", ps.executeUpdate(), query(c, find, LO + 32));
        }
        c.setAutoCommit(false);
        say("lock", query(c, "select c1_0.customer_id,c1_0.name from customers c1_0 where c1_0.customer_id=? for no key update", 1));
        say("lock skip locked", query(c, "select c1_0.customer_id from customers c1_0 where c1_0.customer_id=? "
                + "for update of c1_0 skip locked", 2));
        c.commit();
        c.setAutoCommit(true);
        say("exists", query(c, "select c1_0.customer_id from customers c1_0 where exists(select 1 from orders o1_0 "
                + "where o1_0.customer_id=c1_0.customer_id and o1_0.status=?) order by 1", "shipped"));
        say("row values in", query(c, "select o1_0.order_id,o1_0.line_no,o1_0.quantity from order_items o1_0 "
                + "where (o1_0.order_id,o1_0.line_no) in ((?,?),(?,?)) order by 1", 1, 1, 2, 1));
        try (PreparedStatement ps = c.prepareStatement("insert into orders (created_at,customer_id,status,order_id) "
                + "values (?,?,?,?) returning order_id,status")) {
            ps.setObject(1, OffsetDateTime.of(2024, 5, 1, 0, 0, 0, 0, ZoneOffset.UTC));
            ps.setInt(2, 1);
            ps.setString(3, "open");
            ps.setInt(4, LO + 1);
            say("insert returning", rows(ps.executeQuery()));
        }
        try (PreparedStatement ps = c.prepareStatement("delete from orders where order_id=?")) {
            ps.setInt(1, LO + 1);
            say("remove order", ps.executeUpdate());
        }
        // customer 2 exists in both tenants: only acme's row is touched (the test checks globex's)
        try (PreparedStatement ps = c.prepareStatement("update customers set name=? where customer_id=?")) {
            ps.setString(1, "Road Runner");
            ps.setInt(2, 2);
            say("update shared id", ps.executeUpdate());
        }
        try (PreparedStatement ps = c.prepareStatement("delete from customers where customer_id=?")) {
            ps.setInt(1, LO + 31);
            say("remove", ps.executeUpdate());
            ps.setInt(1, 3); // no such acme customer (globex has none either): nothing to delete
            say("remove missing", ps.executeUpdate());
        }
    }

    /** setAutoCommit(false), a savepoint, a failing insert, rollback to the savepoint, commit. */
    static void transaction(Connection c) throws SQLException {
        c.setAutoCommit(false);
        try (PreparedStatement ins = c.prepareStatement("INSERT INTO customers (customer_id, name, email) VALUES (?, ?, ?)")) {
            ins.setInt(1, LO + 50);
            ins.setString(2, "tx kept");
            ins.setString(3, "tx@x");
            ins.executeUpdate();
            Savepoint sp = c.setSavepoint("before_dup");
            try {
                ins.setInt(1, LO + 51);
                ins.setString(2, "tx dup");
                ins.setString(3, "tx@x"); // duplicate email: unique violation
                ins.executeUpdate();
                say("duplicate inserted");
            } catch (SQLException e) {
                say("savepoint error", e.getSQLState());
                c.rollback(sp);
            }
            ins.setInt(1, LO + 52);
            ins.setString(2, "tx after rollback");
            ins.setString(3, null);
            ins.executeUpdate();
            Savepoint sp2 = c.setSavepoint();
            try (Statement s = c.createStatement()) {
                s.executeUpdate("UPDATE customers SET name = 'renamed' WHERE customer_id = " + (LO + 50));
            }
            c.rollback(sp2);
            c.releaseSavepoint(sp);
            c.commit();
        } finally {
            c.setAutoCommit(true);
        }
        say("after tx", query(c, "SELECT customer_id, name FROM customers WHERE customer_id >= ? ORDER BY 1", LO + 50));
        c.setAutoCommit(false);
        try (Statement s = c.createStatement()) {
            s.executeUpdate("DELETE FROM customers WHERE customer_id >= " + (LO + 50));
            c.rollback();
        } finally {
            c.setAutoCommit(true);
        }
        say("after rollback", query(c, "SELECT count(*) FROM customers WHERE customer_id >= ?", LO + 50));
    }

    /** Connection-level features: read-only transactions, isolation levels, SET/SHOW, connection
     *  options, fetch size (a suspended portal), max rows, several statements in one execute. */
    static void sessionFeatures(Connection c) throws Exception {
        c.setReadOnly(true);
        c.setAutoCommit(false); // the driver begins with BEGIN READ ONLY
        say("read only", query(c, "SELECT count(*) FROM customers"));
        try (Statement s = c.createStatement()) {
            s.executeUpdate("UPDATE customers SET name = name WHERE customer_id = 1");
            say("read only write ran");
        } catch (SQLException e) {
            say("read only write", e.getSQLState());
        }
        c.rollback();
        c.setAutoCommit(true);
        c.setReadOnly(false);

        c.setTransactionIsolation(Connection.TRANSACTION_SERIALIZABLE);
        say("isolation", c.getTransactionIsolation());
        c.setAutoCommit(false);
        say("serializable", query(c, "SELECT count(*) FROM orders WHERE order_id < 1000"));
        c.commit();
        c.setAutoCommit(true);
        c.setTransactionIsolation(Connection.TRANSACTION_READ_COMMITTED);
        say("isolation", c.getTransactionIsolation());

        try (Statement s = c.createStatement()) {
            s.execute("SET TIME ZONE 'UTC'");
            s.execute("SET statement_timeout = 10000");
            c.setAutoCommit(false);
            s.execute("SET LOCAL lock_timeout = 1000");
            say("set", query(c, "SHOW lock_timeout"), query(c, "SHOW statement_timeout"), query(c, "SHOW TimeZone"));
            c.commit();
            c.setAutoCommit(true);
            s.execute("RESET statement_timeout");
            say("reset", query(c, "SHOW statement_timeout"), query(c, "SHOW lock_timeout"));
        }
        c.setClientInfo("ApplicationName", "jdbc-app");
        say("client info", c.getClientInfo("ApplicationName"), query(c, "SHOW application_name"));
        try (Connection o = connect("options=-c%20statement_timeout%3D5000&ApplicationName=jdbc-options")) {
            say("options", query(o, "SHOW statement_timeout"), query(o, "SHOW application_name"));
        }
        say("valid", c.isValid(5));

        c.setAutoCommit(false); // a fetch size only applies in a transaction: Execute with a row limit
        try (PreparedStatement ps = c.prepareStatement("SELECT order_id FROM orders WHERE order_id > ? ORDER BY 1")) {
            ps.setFetchSize(1);
            for (int i = 0; i < 7; i++) { // also once it is server-prepared
                ps.setInt(1, i % 2);
                say("fetch size", i, rows(ps.executeQuery()));
            }
        }
        c.commit();
        c.setAutoCommit(true);
        try (PreparedStatement ps = c.prepareStatement("SELECT customer_id FROM customers WHERE customer_id > ? ORDER BY 1")) {
            ps.setMaxRows(1);
            ps.setInt(1, 0);
            say("max rows", rows(ps.executeQuery()));
        }
        try (Statement s = c.createStatement()) {
            boolean isResult = s.execute("SELECT 1; SELECT count(*) FROM customers; UPDATE customers SET name = name WHERE customer_id = -1");
            List<String> results = new ArrayList<>();
            while (true) {
                if (isResult) results.add("rows " + rows(s.getResultSet()));
                else if (s.getUpdateCount() == -1) break;
                else results.add("count " + s.getUpdateCount());
                isResult = s.getMoreResults();
            }
            say("several statements", results);
            s.addBatch("INSERT INTO customers (customer_id, name) VALUES (" + (LO + 60) + ", 'statement batch')");
            s.addBatch("UPDATE customers SET name = 'statement batch 2' WHERE customer_id = " + (LO + 60));
            s.addBatch("DELETE FROM customers WHERE customer_id = " + (LO + 60));
            say("statement batch", Arrays.toString(s.executeBatch()));
        }
        try (Connection a = connect("autosave=always")) { // a savepoint before every statement
            a.setAutoCommit(false);
            try (PreparedStatement ins = a.prepareStatement("INSERT INTO customers (customer_id, name) VALUES (?, ?)")) {
                ins.setInt(1, LO + 61);
                ins.setString(2, "autosave");
                ins.executeUpdate();
                try {
                    ins.executeUpdate();
                } catch (SQLException e) {
                    say("autosave error", e.getSQLState());
                }
            }
            say("autosave after error", query(a, "SELECT name FROM customers WHERE customer_id = ?", LO + 61));
            a.rollback();
        }
    }

    /** The other ways pgjdbc sends statements: parameters inlined by the driver (simple query
     *  protocol), untyped string parameters, server-prepared and binary from the first run. */
    static void queryModes() throws SQLException {
        try (Connection s = connect("preferQueryMode=simple");
             PreparedStatement ps = s.prepareStatement("SELECT name FROM customers WHERE customer_id IN (?,?) AND name <> ? ORDER BY 1")) {
            ps.setInt(1, 1);
            ps.setInt(2, 2);
            ps.setString(3, "it's");
            say("simple", rows(ps.executeQuery()));
            try (PreparedStatement ins = s.prepareStatement("INSERT INTO customers (customer_id, name) VALUES (?, ?)")) {
                ins.setInt(1, LO + 70);
                ins.setString(2, "simple 'quoted'");
                say("simple insert", ins.executeUpdate(), query(s, "SELECT name FROM customers WHERE customer_id = ?", LO + 70));
            }
        }
        try (Connection s = connect("stringtype=unspecified")) {
            try (PreparedStatement ins = s.prepareStatement("INSERT INTO customers (customer_id, name) VALUES (?, ?)")) {
                ins.setString(1, String.valueOf(LO + 71));
                ins.setString(2, "unspecified");
                say("unspecified insert", ins.executeUpdate());
            }
            say("unspecified", query(s, "SELECT name FROM customers WHERE customer_id = ?", String.valueOf(LO + 71)));
            // an application that names the tenant column sees only its own tenant
            say("other tenant by value", query(s, "SELECT name FROM customers WHERE tenant_id = ? ORDER BY 1", "globex"));
        }
        try (Connection s = connect("prepareThreshold=-1");
             PreparedStatement ps = s.prepareStatement("SELECT order_id, created_at, status FROM orders "
                     + "WHERE customer_id = ? AND created_at > ? ORDER BY 1")) {
            for (int i = 0; i < 2; i++) {
                ps.setInt(1, 1);
                ps.setObject(2, OffsetDateTime.of(2024, 1, 1, 0, 0, 0, 0, ZoneOffset.UTC));
                say("binary", rows(ps.executeQuery()));
            }
        }
    }

    static void types(Connection c) throws SQLException {
        try (PreparedStatement ps = c.prepareStatement("SELECT ?::timestamptz AT TIME ZONE 'UTC', ?::numeric * 2, "
                + "?::jsonb -> 'a', ?::uuid, ?::bytea, ARRAY[1,2], interval '1 day 2 hours', date '2024-01-01' + 1")) {
            ps.setObject(1, OffsetDateTime.of(2024, 1, 1, 12, 0, 0, 0, ZoneOffset.UTC));
            ps.setBigDecimal(2, new BigDecimal("1.25"));
            ps.setString(3, "{\"a\": [1, 2]}");
            ps.setObject(4, UUID.fromString("00000000-0000-0000-0000-000000000001"));
            ps.setBytes(5, new byte[] {1, 2, (byte) 255});
            say("types", rows(ps.executeQuery()));
        }
        try (PreparedStatement ps = c.prepareStatement("SELECT name FROM customers WHERE customer_id = ANY(?) ORDER BY 1")) {
            ps.setArray(1, c.createArrayOf("int4", new Integer[] {1, 2, 3}));
            say("any array", rows(ps.executeQuery()));
        }
        try (java.sql.CallableStatement cs = c.prepareCall("{? = call concat(?, ?)}")) {
            cs.registerOutParameter(1, java.sql.Types.VARCHAR);
            cs.setString(2, "abc");
            cs.setString(3, "def");
            cs.execute();
            say("callable", cs.getString(1));
        }
        // a function of fixed arity: PostgreSQL drops the OUT parameter pgjdbc declares void
        try (java.sql.CallableStatement cs = c.prepareCall("{? = call upper(?)}")) {
            cs.registerOutParameter(1, java.sql.Types.VARCHAR);
            cs.setString(2, "abc");
            cs.execute();
            say("callable fixed arity", cs.getString(1));
        }
        try (java.sql.CallableStatement cs = c.prepareCall("{? = call length(?)}")) {
            cs.registerOutParameter(1, java.sql.Types.INTEGER);
            cs.setString(2, "abcd");
            cs.execute();
            say("callable integer", String.valueOf(cs.getInt(1)));
        }
        say("escapes", query(c, "SELECT {fn ucase(name)}, {d '2024-01-01'} FROM customers WHERE customer_id = {fn abs(-1)}"));
    }

    /** CopyManager: COPY TO STDOUT, and COPY FROM STDIN without the tenant column. */
    static void copy(Connection c) throws Exception {
        CopyManager cm = c.unwrap(PGConnection.class).getCopyAPI();
        StringWriter out = new StringWriter();
        long n = cm.copyOut("COPY (SELECT customer_id, name FROM customers WHERE customer_id < 1000 ORDER BY 1) TO STDOUT "
                + "(FORMAT csv)", out);
        say("copy out", n, out.toString().replace("\n", "/"));
        try { // PostgreSQL refuses COPY FROM under row-level security; tenantgate takes it
            long in = cm.copyIn("COPY customers (customer_id, name) FROM STDIN", new StringReader((LO + 80) + "\tcopied\n"));
            say("copy in ok", in, query(c, "SELECT name FROM customers WHERE customer_id = ?", LO + 80));
            try (Statement s = c.createStatement()) {
                s.executeUpdate("DELETE FROM customers WHERE customer_id = " + (LO + 80));
            }
        } catch (SQLException e) {
            say("copy in ERROR", e.getSQLState());
        }
    }

    /** An updatable ResultSet: the driver writes UPDATE/INSERT/DELETE by the primary key, which
     *  includes the tenant column. */
    static void updatableResultSet(Connection c) throws SQLException {
        try (Statement s = c.createStatement(ResultSet.TYPE_SCROLL_INSENSITIVE, ResultSet.CONCUR_UPDATABLE)) {
            ResultSet rs = s.executeQuery("SELECT tenant_id, customer_id, name FROM customers WHERE customer_id < 0");
            rs.moveToInsertRow();
            rs.updateString("tenant_id", "acme");
            rs.updateInt("customer_id", LO + 90);
            rs.updateString("name", "inserted row");
            rs.insertRow();
            rs.close();
            rs = s.executeQuery("SELECT tenant_id, customer_id, name FROM customers WHERE customer_id = " + (LO + 90));
            rs.next();
            rs.updateString("name", "updated row");
            rs.updateRow();
            say("updatable", rs.getString("name"), query(c, "SELECT name FROM customers WHERE customer_id = ?", LO + 90));
            rs.deleteRow();
            rs.close();
            say("updatable deleted", query(c, "SELECT count(*) FROM customers WHERE customer_id = ?", LO + 90));
        }
    }

    /** What a tenant may not do: the same SQLSTATE both ways, or a documented difference. */
    static void refusals(Connection c, String schema) throws SQLException {
        try (Statement s = c.createStatement()) {
            s.executeQuery("SELECT * FROM pg_authid");
            say("pg_authid readable");
        } catch (SQLException e) {
            say("pg_authid", e.getSQLState());
        }
        c.setAutoCommit(false);
        try { // LargeObjectManager calls lo_creat with a FunctionCall message
            c.unwrap(PGConnection.class).getLargeObjectAPI().createLO();
            say("large object created");
        } catch (SQLException e) {
            say("large object", e.getSQLState());
        }
        c.rollback();
        c.setAutoCommit(true);
        try (Statement s = c.createStatement()) {
            s.execute("LISTEN jdbc_app");
            s.execute("UNLISTEN jdbc_app");
            say("listen ok");
        } catch (SQLException e) {
            say("listen ERROR", e.getSQLState());
        }
        say("after refusals", query(c, "SELECT count(*) FROM customers WHERE customer_id < 1000"));
        try (Connection s = connect("currentSchema=" + schema)) {
            say("currentSchema ok", query(s, "SELECT count(*) FROM customers WHERE customer_id < 1000"));
        } catch (SQLException e) {
            say("currentSchema ERROR", e.getSQLState());
        }
    }
}
