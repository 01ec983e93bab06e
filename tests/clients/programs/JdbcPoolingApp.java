// A Java (pgjdbc) application as a connection pool drives it: several threads, each on its own
// connection, reusing server-prepared statements (the driver names them S_1, S_2, … on every
// connection, so the names collide across clients sharing tenantgate's pooled backends);
// several open portals on one connection; query timeouts inside a transaction and on a
// server-prepared statement that is used again afterwards; batches that return generated keys;
// a rewritten batch with ON CONFLICT; a 512-parameter IN list; SQL comments.  Prints a
// deterministic transcript (per-thread results are collected and printed in thread order).
//
//   java -cp /usr/share/java/postgresql.jar JdbcPoolingApp.java <jdbc-url> <user> <password> [<schema>, unused]

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;

public class JdbcPoolingApp {
    static final int LO = 975500; // this program's private id range (the upper half of JdbcApp's); removed at the end
    static final int THREADS = 4, ROUNDS = 24;

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

    static List<String> rows(ResultSet rs) throws SQLException {
        List<String> out = new ArrayList<>();
        int n = rs.getMetaData().getColumnCount();
        while (rs.next()) {
            List<String> row = new ArrayList<>();
            for (int i = 1; i <= n; i++) row.add(String.valueOf(rs.getObject(i)));
            out.add(String.join("|", row));
        }
        rs.close();
        return out;
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
        try (Connection c = connect(null)) {
            say("seed", query(c, "SELECT customer_id, name FROM customers WHERE customer_id < 1000 ORDER BY 1"));
            threads();
            portals(c);
            timeouts(c);
            generatedKeys(c);
            statementShapes(c);
            try (PreparedStatement ps = c.prepareStatement("DELETE FROM customers WHERE customer_id BETWEEN ? AND ?")) {
                ps.setInt(1, LO);
                ps.setInt(2, LO + 499);
                say("cleanup", ps.executeUpdate());
            }
        }
        say("done");
    }

    /** THREADS connections at once, each running the same three statements ROUNDS times (server-
     *  prepared after the fifth), every third round in an explicit transaction. */
    static void threads() throws Exception {
        ExecutorService pool = Executors.newFixedThreadPool(THREADS);
        List<Future<String>> results = new ArrayList<>();
        for (int t = 0; t < THREADS; t++) {
            final int base = LO + t * 100;
            results.add(pool.submit(() -> {
                try (Connection k = connect(null);
                     PreparedStatement ins = k.prepareStatement("INSERT INTO customers (customer_id, name) VALUES (?, ?)");
                     PreparedStatement sel = k.prepareStatement("SELECT name FROM customers WHERE customer_id IN (?,?) ORDER BY 1");
                     PreparedStatement cnt = k.prepareStatement("SELECT count(*), min(customer_id) - ?, max(customer_id) - ? "
                             + "FROM customers WHERE customer_id >= ? AND customer_id < ?")) {
                    int seen = 0;
                    for (int i = 0; i < ROUNDS; i++) {
                        boolean tx = i % 3 == 0;
                        if (tx) k.setAutoCommit(false);
                        ins.setInt(1, base + i);
                        ins.setString(2, "thread row " + i);
                        ins.executeUpdate();
                        sel.setInt(1, 2); // Road Runner, and the row just inserted
                        sel.setInt(2, base + i);
                        if (rows(sel.executeQuery()).equals(List.of("Road Runner", "thread row " + i))) seen++;
                        if (tx) {
                            k.commit();
                            k.setAutoCommit(true);
                        }
                    }
                    for (int i = 1; i <= 4; i++) cnt.setInt(i, i <= 3 ? base : base + 100);
                    return "seen " + seen + " " + rows(cnt.executeQuery());
                }
            }));
        }
        for (int t = 0; t < THREADS; t++) say("thread", t, results.get(t).get());
        pool.shutdown();
    }

    /** Two portals read a row at a time (fetch size 1, in a transaction), interleaved with each
     *  other and with a third statement on the same connection. */
    static void portals(Connection c) throws SQLException {
        c.setAutoCommit(false);
        List<String> got = new ArrayList<>();
        try (PreparedStatement p1 = c.prepareStatement("SELECT order_id FROM orders WHERE order_id < 1000 ORDER BY 1");
             PreparedStatement p2 = c.prepareStatement("SELECT customer_id FROM customers WHERE customer_id < 1000 ORDER BY 1")) {
            p1.setFetchSize(1);
            p2.setFetchSize(1);
            ResultSet r1 = p1.executeQuery();
            r1.next();
            got.add("order " + r1.getInt(1));
            got.add("products " + query(c, "SELECT count(*) FROM products"));
            ResultSet r2 = p2.executeQuery();
            while (r1.next()) {
                got.add("order " + r1.getInt(1));
                if (r2.next()) got.add("customer " + r2.getInt(1));
            }
            r1.close();
            r2.close();
        }
        c.commit();
        c.setAutoCommit(true);
        say("portals", got);
    }

    /** A timeout inside a transaction aborts it (the rollback works, the connection stays usable);
     *  a timed-out server-prepared statement runs again. */
    static void timeouts(Connection c) throws SQLException {
        c.setAutoCommit(false);
        try (PreparedStatement ps = c.prepareStatement("SELECT pg_sleep(?)")) {
            ps.setQueryTimeout(1);
            ps.setDouble(1, 5);
            rows(ps.executeQuery());
            say("timeout in transaction: query finished");
        } catch (SQLException e) {
            say("timeout in transaction", e.getSQLState());
        }
        try {
            query(c, "SELECT 1");
            say("aborted transaction ran a statement");
        } catch (SQLException e) {
            say("aborted transaction", e.getSQLState());
        }
        c.rollback();
        c.setAutoCommit(true);
        try (PreparedStatement ps = c.prepareStatement("SELECT pg_sleep(?), ?::int")) {
            ps.setQueryTimeout(1);
            for (int i = 0; i < 6; i++) {
                ps.setDouble(1, 0);
                ps.setInt(2, i);
                rows(ps.executeQuery());
            }
            ps.setDouble(1, 5);
            try {
                rows(ps.executeQuery());
                say("server-prepared timeout: query finished");
            } catch (SQLException e) {
                say("server-prepared timeout", e.getSQLState());
            }
            ps.setDouble(1, 0);
            ps.setInt(2, 42);
            say("server-prepared again", rows(ps.executeQuery()));
        }
    }

    /** RETURN_GENERATED_KEYS on a batch (the driver appends RETURNING *), and named keys on a
     *  batch the driver rewrites into one multi-row INSERT. */
    static void generatedKeys(Connection c) throws SQLException {
        try (PreparedStatement ps = c.prepareStatement("INSERT INTO customers (customer_id, name) VALUES (?, ?)",
                Statement.RETURN_GENERATED_KEYS)) {
            for (int i = 0; i < 3; i++) {
                ps.setInt(1, LO + 400 + i);
                ps.setString(2, "keyed " + i);
                ps.addBatch();
            }
            say("batch", Arrays.toString(ps.executeBatch()));
            List<String> keys = new ArrayList<>();
            ResultSet rs = ps.getGeneratedKeys();
            while (rs.next()) keys.add(rs.getString("tenant_id") + "/" + rs.getInt("customer_id") + "/" + rs.getString("name"));
            say("generated keys", keys);
        }
        try (Connection r = connect("reWriteBatchedInserts=true");
             PreparedStatement ps = r.prepareStatement("INSERT INTO customers (customer_id, name) VALUES (?, ?)",
                     new String[] {"customer_id"})) {
            for (int i = 0; i < 5; i++) {
                ps.setInt(1, LO + 410 + i);
                ps.setString(2, "rewritten keyed " + i);
                ps.addBatch();
            }
            ps.executeBatch();
            say("rewritten generated keys", rows(ps.getGeneratedKeys()));
            // ids 1 and 2 exist in both tenants: only acme's rows conflict, globex's do not matter
            try (PreparedStatement oc = r.prepareStatement(
                    "insert into customers (customer_id, name) values (?, ?) on conflict do nothing")) {
                for (int id : new int[] {1, 2, LO + 420, LO + 421}) {
                    oc.setInt(1, id);
                    oc.setString(2, "on conflict");
                    oc.addBatch();
                }
                say("rewritten on conflict", Arrays.toString(oc.executeBatch()));
            }
            say("after on conflict", query(r, "SELECT customer_id, name FROM customers "
                    + "WHERE customer_id < 1000 OR customer_id >= ? ORDER BY 1", LO + 420));
        }
    }

    /** A 512-parameter IN list (Hibernate's in_clause_parameter_padding), server-prepared, and
     *  statements with SQL comments (hibernate.use_sql_comments). */
    static void statementShapes(Connection c) throws SQLException {
        StringBuilder sql = new StringBuilder("select c1_0.name from customers c1_0 where c1_0.customer_id in (");
        for (int i = 0; i < 512; i++) sql.append(i == 0 ? "?" : ",?");
        sql.append(") order by 1");
        try (PreparedStatement ps = c.prepareStatement(sql.toString())) {
            for (int run = 0; run < 6; run++) {
                for (int i = 0; i < 512; i++) ps.setInt(i + 1, i + 1 + run);
                say("512 parameters", run, rows(ps.executeQuery()));
            }
        }
        say("comments", query(c, "/* load Customer */ select c1_0.name from customers c1_0 where c1_0.customer_id=? -- by id\n", 1));
    }
}
