\pset pager off
\d products
\dt
\di orders*
\x on
SELECT customer_id, name FROM customers WHERE customer_id < 1000 ORDER BY 1 LIMIT 1;
\x off
SELECT count(*) AS n FROM orders WHERE order_id < 1000 \gset
\echo orders :n
\copy (SELECT customer_id, name FROM customers WHERE customer_id < 1000 ORDER BY 1) TO STDOUT
