# PostgreSQL 18 with pgvector and Citus 14, for docker-compose.yml's `citus` profile.
# pgvector's image, plus Citus from the Citus community apt repository (packages named
# postgresql-18-citus-14.0; docs.citusdata.com "Multi-Node Citus on Debian").
FROM pgvector/pgvector:0.8.1-pg18
RUN apt-get update && apt-get install -y --no-install-recommends curl ca-certificates \
 && curl -fsSL https://install.citusdata.com/community/deb.sh | bash \
 && apt-get install -y --no-install-recommends postgresql-18-citus-14.0 \
 && apt-get purge -y curl && rm -rf /var/lib/apt/lists/*
# Every node preloads Citus and allows the two-phase commits of multi-shard writes.
CMD ["postgres", "-c", "shared_preload_libraries=citus", "-c", "max_prepared_transactions=100"]
