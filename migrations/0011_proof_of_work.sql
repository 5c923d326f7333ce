-- A product whose waiting room asks each joining shopper for a proof of work (src/pow.rs).
alter table product add column if not exists proof_of_work boolean not null default false;
