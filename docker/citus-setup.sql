-- Run once on the coordinator by docker-compose.yml's citus-setup service (idempotent).
CREATE EXTENSION IF NOT EXISTS citus;
CREATE EXTENSION IF NOT EXISTS vector;
-- The nodes connect to each other as vecsearch with its password (scram, no trust).
INSERT INTO pg_dist_authinfo (nodeid, rolename, authinfo)
    VALUES (0, 'vecsearch', 'password=vecsearch') ON CONFLICT DO NOTHING;
SELECT citus_set_coordinator_host('citus-coordinator', 5432);
SELECT citus_add_node('citus-worker1', 5432) WHERE NOT EXISTS
    (SELECT FROM pg_dist_node WHERE nodename = 'citus-worker1');
SELECT citus_add_node('citus-worker2', 5432) WHERE NOT EXISTS
    (SELECT FROM pg_dist_node WHERE nodename = 'citus-worker2');
