-- Wins that could not become orders (only after Redis lost data): over stock, or a second win
-- of a shopper who already holds an order for the product. Terminal; the shopper sees
-- `rejected` with `reason` at /reservations/me, even after Redis lost its data again.
create table if not exists rejection (
    reservation_id uuid not null constraint rejection_pkey primary key,
    user_id        bigint not null constraint rejection_user_check check (user_id > 0),
    product_id     bigint not null constraint rejection_product_fkey references product (product_id),
    reason         text not null,
    created_at     timestamptz not null default now()
);

-- The shopper's view falls back to Postgres by (user, product); a rebuild reads by product.
create index if not exists rejection_product_user_idx on rejection (product_id, user_id);
